"""Runs the model for one scheduled step: flattens the sequences' tokens into one batch and builds
the `AttentionContext` (positions, cache slots, block tables, masks) shared by all layers."""

from __future__ import annotations

import torch

from budrt.engine import kernels
from budrt.engine.attention import AttentionContext, PrefillChunk
from budrt.engine.kv_cache import KVCache
from budrt.engine.llama import LlamaForCausalLM
from budrt.engine.scheduler import ScheduledBatch
from budrt.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.device = cache.data.device
        if self.device.type == "cpu":
            kernels.prepare()  # the CPU kernels: loaded (or, if never built here, compiled) now

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _table(self, seq: Sequence, length: int) -> list[int]:
        return seq.block_table[: (length + self.block_size - 1) // self.block_size]

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, AttentionContext, list[Sequence]]:
        """Flat inputs for `batch`, single-token rows first; also the sequences that sample."""
        decodes = [(s, n) for s, n in batch if n == 1]
        chunks = [(s, n) for s, n in batch if n > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        samplers: list[Sequence] = []
        lengths: list[int] = []
        for row, (seq, _) in enumerate(decodes):
            pos = seq.num_computed_tokens
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(self._slots(seq, pos, pos + 1)[0])
            lengths.append(pos + 1)
            if pos + 1 == seq.num_tokens:
                logits_rows.append(row)
                samplers.append(seq)
        dev = self.device
        ctx = AttentionContext(positions=torch.empty(0), slots=torch.empty(0), num_decode=len(decodes))
        if decodes:
            ctx.decode_context = max(lengths)
            width = (ctx.decode_context + self.block_size - 1) // self.block_size
            tables = [self._table(s, n) for (s, _), n in zip(decodes, lengths, strict=True)]
            tables = [t + [0] * (width - len(t)) for t in tables]
            first = tables[0][0]
            if len(tables) == 1 and tables[0] == list(range(first, first + width)):
                ctx.decode_first_block = first  # no gather needed: the blocks are one slice
            ctx.decode_block_tables = torch.tensor(tables, dtype=torch.long, device=dev)
            ctx.decode_lengths = torch.tensor(lengths, dtype=torch.long, device=dev)
            if min(lengths) != ctx.decode_context:  # rows shorter than the longest mask the rest
                lens = torch.tensor(lengths, device=dev)
                mask = torch.arange(ctx.decode_context, device=dev).unsqueeze(0) < lens.unsqueeze(1)
                ctx.decode_mask = mask[:, None, None, :]
        for seq, n in chunks:
            start = seq.num_computed_tokens
            end = start + n
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            table = mask = row_lengths = None
            seeded = seq.params.seed is not None
            if start > 0 or seeded:
                table = torch.tensor([self._table(seq, end)], dtype=torch.long, device=dev)
            if seeded:  # see PrefillChunk.row_lengths
                row_lengths = torch.arange(start + 1, end + 1, dtype=torch.long, device=dev)
            if start > 0:  # attend over the cached prefix too: gather it, mask causally with offset
                q_pos = torch.arange(start, end, device=dev).unsqueeze(1)
                mask = torch.arange(end, device=dev).unsqueeze(0) <= q_pos
            ctx.prefills.append(PrefillChunk(row, n, end, table, mask, row_lengths))
            if end == seq.num_tokens:
                logits_rows.append(row + n - 1)
                samplers.append(seq)
        ctx.decode_only = bool(decodes) and not chunks
        ctx.positions = torch.tensor(positions, dtype=torch.long, device=dev)
        ctx.slots = torch.tensor(slots, dtype=torch.long, device=dev)
        if len(logits_rows) != len(ids):
            ctx.logits_rows = torch.tensor(logits_rows, dtype=torch.long, device=dev)
        return torch.tensor(ids, dtype=torch.long, device=dev), ctx, samplers

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """One forward over the step's tokens: logits `[S, vocab]` of the S sequences that sample."""
        input_ids, ctx, samplers = self.prepare(batch)
        if self.model.small_weights is not None:  # see SmallWeights: which steps may use them
            seeded = any(seq.params.seed is not None for seq, _ in batch)
            self.model.small_weights.allowed = not ctx.prefills and not seeded
            self.model.small_weights.exact = seeded
        if not samplers:  # only middle-of-prompt chunks: nothing to sample, skip the vocab matmul
            ctx.logits_rows = torch.empty(0, dtype=torch.long, device=self.device)
        logits = self.model(input_ids, ctx, self.cache)
        return logits.cpu(), samplers
