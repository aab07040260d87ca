"""Which sequences run this step: continuous batching at iteration level.

Every step, waiting requests are admitted (first come, first served) while a KV slot is free and
the step's prefill token budget lasts; all running sequences then decode one token together.
Finished or aborted sequences give their slot back at once, so a new request can take it in the
very next step.
"""

from __future__ import annotations

from collections import deque

from budrt.engine.kv_cache import KVCache
from budrt.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, cache: KVCache, max_prefill_tokens: int) -> None:
        self.cache = cache
        # Bounds how long one step's prefills may stall the running sequences' decode. A prompt
        # longer than the budget is still admitted when it is the first one in the step.
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots; they need a prefill this step."""
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and self.cache.num_free > 0:
            seq = self.waiting[0]
            if admitted and seq.num_prompt_tokens > budget:
                break
            self.waiting.popleft()
            seq.slot = self.cache.allocate()
            seq.status = SequenceStatus.RUNNING
            budget -= seq.num_prompt_tokens
            admitted.append(seq)
        self.running.extend(admitted)
        return admitted

    def decode_batch(self, exclude: list[Sequence]) -> list[Sequence]:
        """Running sequences that already have a token to feed, ordered by slot.

        Slot order makes the batch's slots 0..B-1 whenever no slot below is free, which lets the
        cache hand out views instead of gathered copies.
        """
        skip = {id(s) for s in exclude}
        batch = [s for s in self.running if id(s) not in skip and not s.is_finished]
        return sorted(batch, key=lambda s: s.slot if s.slot is not None else -1)

    def finish(self, seq: Sequence) -> None:
        """Release a sequence (finished, aborted or failed), wherever it is."""
        if seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            if seq.slot is not None:
                self.cache.free(seq.slot)
                seq.slot = None
        seq.status = SequenceStatus.FINISHED

    def kv_token_usage(self) -> float:
        return self.cache.used_tokens([s.num_tokens for s in self.running])
