"""Attention over the paged KV cache for one engine step (decodes and prefill chunks together).

A step's tokens are flattened into one `[N, ...]` batch: first every sequence that feeds a single
token (decodes), then the prefill chunks, one after another. The projections and MLP run once over
all N tokens; only attention is split: the single-token rows attend together over their gathered
blocks, and each prefill chunk attends causally over its sequence's cached prefix plus itself.
On CPU the single-token rows use the C++ kernel (kernels.py), which reads the cache through the
block tables; otherwise (CUDA, or no compiler) their blocks are gathered into a padded copy and
masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from budrt.engine import kernels
from budrt.engine.kv_cache import KVCache
from budrt.engine.step_path import DENSE, StepPath


@dataclass
class PrefillChunk:
    start: int  # first row of this chunk in the flat batch
    length: int  # tokens in the chunk
    context: int  # positions attended to: cached prefix + this chunk
    block_table: torch.Tensor | None  # [1, blocks]; None when nothing is cached before the chunk
    mask: torch.Tensor | None  # [length, context] bool, causal with the prefix offset
    # A seeded request's chunk: each row attends alone through the decode kernel, over this many
    # positions (`[length]`), so its values do not depend on how the prompt was cut into chunks.
    row_lengths: torch.Tensor | None = None


@dataclass
class AttentionContext:
    positions: torch.Tensor  # [N] position of every token
    slots: torch.Tensor  # [N] where every token's k/v entry is written in the cache
    num_decode: int  # rows 0..num_decode-1 are single-token queries
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks]
    decode_context: int = 0  # longest context among the single-token rows
    decode_lengths: torch.Tensor | None = None  # [num_decode] int64 context of each row
    decode_only: bool = False  # every row decodes one token (no prefill chunk) this step
    decode_mask: torch.Tensor | None = None  # [num_decode, 1, 1, decode_context]; None if all equal
    # One decoding row whose blocks are consecutive in the cache: attend over a view from this block.
    decode_first_block: int | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    logits_rows: torch.Tensor | None = None  # rows whose next-token logits are needed
    path: StepPath = DENSE  # which weights and code this step runs on (step_path.PathRule.choose)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: AttentionContext,
    cache: KVCache,
    layer: int,
    written: bool = False,
) -> torch.Tensor:
    """q `[N, heads, D]`, k/v `[N, kv_heads, D]` (already RoPE'd) -> `[N, heads * D]`. `written`:
    k and v are in the cache already (kernels.rope_cache_write)."""
    n, heads, dim = q.shape
    if not written:
        cache.write(layer, ctx.slots, k, v)
    if ctx.num_decode == n and not ctx.prefills:
        return _decode(q, ctx, cache, layer).reshape(n, heads * dim)
    out = torch.empty_like(q)
    if ctx.num_decode:
        out[: ctx.num_decode] = _decode(q[: ctx.num_decode], ctx, cache, layer)
    for chunk in ctx.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        if chunk.row_lengths is not None and kernels.use_paged_kernel(q, cache.data):
            assert chunk.block_table is not None
            keys, values = cache.layer(layer)
            tables = chunk.block_table.expand(chunk.length, -1).contiguous()
            out[rows] = kernels.paged_decode_attention(
                q[rows], keys, values, tables, chunk.row_lengths, dim**-0.5
            )
            continue
        qc = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, T, D]
        if chunk.block_table is None:  # fresh prompt: attend over the chunk's own k/v
            kc = k[rows].transpose(0, 1).unsqueeze(0)
            vc = v[rows].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True)
        else:
            kc, vc = cache.gather(layer, chunk.block_table, chunk.context)
            kc, vc = kc.to(q.dtype), vc.to(q.dtype)  # a 16-bit cache under fp32 activations
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=chunk.mask, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)
    return out.reshape(n, heads * dim)


def _decode(q: torch.Tensor, ctx: AttentionContext, cache: KVCache, layer: int) -> torch.Tensor:
    if ctx.decode_lengths is not None and kernels.use_paged_kernel(q, cache.data):
        assert ctx.decode_block_tables is not None
        keys, values = cache.layer(layer)
        return kernels.paged_decode_attention(
            q, keys, values, ctx.decode_block_tables, ctx.decode_lengths, q.shape[-1] ** -0.5
        )
    if ctx.decode_first_block is not None:
        keys, values = cache.window(layer, ctx.decode_first_block, ctx.decode_context)
    else:
        assert ctx.decode_block_tables is not None
        keys, values = cache.gather(layer, ctx.decode_block_tables, ctx.decode_context)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys.to(q.dtype), values.to(q.dtype), attn_mask=ctx.decode_mask, enable_gqa=True
    )
    return o.squeeze(2)  # [B, heads, D]
