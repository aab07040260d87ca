"""Runs the model for one scheduled step: flattens the sequences' tokens into one batch and builds
the `AttentionContext` (positions, cache slots, block tables, masks) shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from budrt.engine import kernels
from budrt.engine.attention import AttentionContext, PrefillChunk
from budrt.engine.kv_cache import KVCache
from budrt.engine.llama import LayerStack, LlamaForCausalLM
from budrt.engine.scheduler import ScheduledBatch
from budrt.engine.sequence import Sequence
from budrt.engine.step_path import PathRule


@dataclass(slots=True)
class _Rows:
    """A step's tokens flattened into rows, and which rows (of which sequences) sample."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # where each row's k/v is written in the cache
    logits_rows: list[int] = field(default_factory=list)
    samplers: list[Sequence] = field(default_factory=list)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        cache: KVCache,
        rule: PathRule | None = None,
        stack: LayerStack | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.rule = rule or PathRule()  # which weights and code each step runs on
        self.stack = stack  # the one-call decode layers, for steps whose path says so
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
        decodes = [seq for seq, n in batch if n == 1]
        chunks = [(seq, n) for seq, n in batch if n > 1]
        rows = _Rows()
        ctx = AttentionContext(positions=torch.empty(0), slots=torch.empty(0), num_decode=len(decodes))
        if decodes:
            self._add_decodes(decodes, rows, ctx)
        for seq, n in chunks:
            self._add_chunk(seq, n, rows, ctx)
        dev = self.device
        ctx.decode_only = bool(decodes) and not chunks
        ctx.positions = torch.tensor(rows.positions, dtype=torch.long, device=dev)
        ctx.slots = torch.tensor(rows.slots, dtype=torch.long, device=dev)
        if len(rows.logits_rows) != len(rows.ids):
            ctx.logits_rows = torch.tensor(rows.logits_rows, dtype=torch.long, device=dev)
        return torch.tensor(rows.ids, dtype=torch.long, device=dev), ctx, rows.samplers

    def _add_decodes(self, decodes: list[Sequence], rows: _Rows, ctx: AttentionContext) -> None:
        """One row per decoding sequence, and the block tables (and mask) its attention reads."""
        lengths: list[int] = []
        for row, seq in enumerate(decodes):
            pos = seq.num_computed_tokens
            rows.ids.append(seq.token_ids[pos])
            rows.positions.append(pos)
            rows.slots.append(self._slots(seq, pos, pos + 1)[0])
            lengths.append(pos + 1)
            if pos + 1 == seq.num_tokens:
                rows.logits_rows.append(row)
                rows.samplers.append(seq)
        dev = self.device
        ctx.decode_context = max(lengths)
        width = (ctx.decode_context + self.block_size - 1) // self.block_size
        tables = [self._table(seq, n) for seq, n in zip(decodes, lengths, strict=True)]
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

    def _add_chunk(self, seq: Sequence, n: int, rows: _Rows, ctx: AttentionContext) -> None:
        """The rows of `n` prompt tokens of `seq`, and the `PrefillChunk` its attention reads."""
        dev = self.device
        start = seq.num_computed_tokens
        end = start + n
        row = len(rows.ids)
        rows.ids.extend(seq.token_ids[start:end])
        rows.positions.extend(range(start, end))
        rows.slots.extend(self._slots(seq, start, end))
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
            rows.logits_rows.append(row + n - 1)
            rows.samplers.append(seq)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """One forward over the step's tokens: logits `[S, vocab]` of the S sequences that sample."""
        input_ids, ctx, samplers = self.prepare(batch)
        seeded = any(seq.params.seed is not None for seq, _ in batch)
        ctx.path = self.rule.choose(len(input_ids), ctx.decode_only, seeded)
        if not samplers:  # only middle-of-prompt chunks: nothing to sample, skip the vocab matmul
            ctx.logits_rows = torch.empty(0, dtype=torch.long, device=self.device)
        logits = self.model(input_ids, ctx, self.cache, self.stack)
        return logits.cpu(), samplers
