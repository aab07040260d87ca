"""Which sequences run this step, and how many of their tokens: continuous batching with a token budget.

Every step has a budget of `max_num_batched_tokens` tokens. Running sequences go first, oldest
first: a decoding sequence feeds one token, a sequence still in its prompt feeds the next chunk
of it (chunked prefill), so a long prompt never stalls the others' decoding for more than one
chunk. What is left of the budget admits waiting sequences (first come, first served) while
`max_num_seqs` and the free KV blocks allow.

When a decoding sequence needs a fresh block and none is free, the youngest running sequence is
preempted by recompute: its blocks are freed and it goes back to the head of the queue with all
its tokens (prompt + output so far) as its new prompt. Nothing is lost; its full blocks usually
come back from the prefix cache.
"""

from __future__ import annotations

from collections import deque

from budrt.engine.block_manager import BlockManager
from budrt.engine.sequence import Sequence, SequenceStatus

ScheduledBatch = list[tuple[Sequence, int]]  # (sequence, tokens computed for it this step)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the youngest is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch: ScheduledBatch = []
        queue = deque(self.running)
        kept: list[Sequence] = []
        preempted = False
        while queue:
            seq = queue.popleft()
            if budget <= 0:
                kept.append(seq)  # runs next step
                continue
            while self.blocks.blocks_short(seq) > self.blocks.num_free:
                preempted = True
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    break
            if seq.status is SequenceStatus.WAITING:
                break
            self.blocks.append_slots(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            budget -= n
            batch.append((seq, n))
            kept.append(seq)
        self.running = kept

        # Admitting while preempting would only thrash: wait for blocks to come back first.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            budget -= n
            batch.append((seq, n))
            self.running.append(seq)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a sequence (finished, aborted or failed), wherever it is; its blocks are free now."""
        if seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq.status is SequenceStatus.RUNNING:
            try:
                self.running.remove(seq)
            except ValueError:
                pass
            self.blocks.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
