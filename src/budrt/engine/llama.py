"""A Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2 q/k/v biases, Qwen3 QK-norm) in PyTorch.

The math follows transformers' `LlamaForCausalLM` (rotate_half RoPE, RMSNorm computed in fp32) so
greedy outputs match it token for token. The only engine-specific part is attention: every layer
writes its keys/values into the engine's KV cache and attends over it, as told by an
`AttentionContext` that the model runner builds once per forward.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from budrt.engine import int8, kernels, quant
from budrt.engine.attention import AttentionContext, paged_attention
from budrt.engine.kv_cache import KVCache
from budrt.engine.linear import Linear
from budrt.engine.rope import rope_attention_factor, rope_inv_freq

# The checkpoints' separate projections, concatenated along the output at load (`fuse_weights`):
# one matmul instead of three (two), and q and k adjacent in one output for RoPE.
FUSED = {
    "attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}

# Builds the linear named (e.g. "layers.3.attn.qkv_proj", "lm_head") from the loaded weights.
MakeLinear = Callable[[str], Linear]


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    # Hugging Face rope parameters ("rope_type": "linear" | "llama3" with their keys); None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):  # bf16 on CPU: one C++ pass, same math (csrc/rms_norm.cpp)
            return kernels.rms_norm(x, self.weight, self.eps)
        # Normalize in fp32 like transformers does: bf16 variance loses too much precision.
        dtype = x.dtype
        if dtype != torch.float32:  # one fused kernel; fp32 keeps transformers' exact op order
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its norm): the residual stream and the next sublayer's input."""
        if self._use_kernel(x) and delta.is_contiguous():
            return kernels.add_rms_norm(x, delta, self.weight, self.eps)
        total = x + delta
        return total, self(total)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return x.is_contiguous() and self.weight.dtype == x.dtype and kernels.use_norm_kernel(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for all positions, computed once in fp32 and looked up per token."""

    def __init__(
        self, head_dim: int, theta: float, max_positions: int, scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rope_attention_factor(scaling)  # YaRN scales cos/sin; 1.0 otherwise
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        # sin with its first half negated: rotate_half(x) * sin == roll(x, half) * this, exactly
        # (a sign flip is exact), in one op instead of slice/neg/cat; see apply_rope.
        sin = emb.sin() * scale
        half = head_dim // 2
        self.register_buffer("sin", torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, T, D] -> [B, 1, T, D] to broadcast over heads.
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin`, with the sign folded into `signed_sin`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, prefix: str, layer_idx: int, make_linear: MakeLinear) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.qkv_proj = make_linear(f"{prefix}.qkv_proj")
        self.o_proj = make_linear(f"{prefix}.o_proj")
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.qkv_sizes = [args.num_heads * args.head_dim] + [args.num_kv_heads * args.head_dim] * 2

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: AttentionContext,
        cache: KVCache,
    ) -> torch.Tensor:
        # x is the step's flat batch `[N, hidden]` (see engine/attention.py).
        path = ctx.path
        qkv = self.qkv_proj(x, path.small, path.split_rows)
        if self.qk_norm:
            attended = self._attend_qk_norm(qkv, cos, sin, ctx, cache)
        elif kernels.use_fused_rope(qkv, cache.data):
            attended = self._attend_fused(qkv, cos, sin, ctx, cache)
        else:
            n = x.shape[0]
            qk_width = self.qkv_sizes[0] + self.qkv_sizes[1]
            v = qkv[:, qk_width:].view(n, self.num_kv_heads, self.head_dim)
            # q and k are adjacent in the fused output: RoPE for both in one go.
            qk = apply_rope(qkv[:, :qk_width].view(n, -1, self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            attended = paged_attention(q, k, v, ctx, cache, self.layer_idx)
        return self.o_proj(attended, path.small, path.split_rows)

    def _attend_fused(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext, cache: KVCache
    ) -> torch.Tensor:
        """RoPE and cache write in one C++ call (same math), and for a decode-only step the
        attention too."""
        n = qkv.shape[0]
        keys, values = cache.layer(self.layer_idx)
        if not ctx.decode_only:
            v = qkv[:, self.qkv_sizes[0] + self.qkv_sizes[1] :].view(n, self.num_kv_heads, self.head_dim)
            q, k = kernels.rope_cache_write(
                qkv, cos.view(n, -1), sin.view(n, -1), keys, values, ctx.slots, self.num_heads
            )
            return paged_attention(q, k, v, ctx, cache, self.layer_idx, written=True)
        assert ctx.decode_block_tables is not None and ctx.decode_lengths is not None
        return kernels.rope_cache_decode_attention(
            qkv,
            cos.view(n, -1),
            sin.view(n, -1),
            keys,
            values,
            ctx.slots,
            ctx.decode_block_tables,
            ctx.decode_lengths,
            self.num_heads,
            self.head_dim**-0.5,
        )

    def _attend_qk_norm(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext, cache: KVCache
    ) -> torch.Tensor:
        """Qwen3: RMSNorm over each head of q and k (the last axis) before RoPE."""
        n = qkv.shape[0]
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = self.q_norm(q.view(n, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(n, self.num_kv_heads, self.head_dim))
        v = v.view(n, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return paged_attention(q, k, v, ctx, cache, self.layer_idx)


class MLP(nn.Module):
    def __init__(self, prefix: str, make_linear: MakeLinear) -> None:
        super().__init__()
        self.gate_up_proj = make_linear(f"{prefix}.gate_up_proj")
        self.down_proj = make_linear(f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        path = ctx.path
        gate_up = self.gate_up_proj(x, path.small, path.split_rows)
        if kernels.use_silu_kernel(gate_up):  # one pass, same roundings (csrc/silu_mul.cpp)
            hidden = kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        return self.down_proj(hidden, path.small, path.split_rows)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int, make_linear: MakeLinear) -> None:
        super().__init__()
        prefix = f"layers.{layer_idx}"
        self.input_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = Attention(args, f"{prefix}.attn", layer_idx, make_linear)
        self.post_attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(f"{prefix}.mlp", make_linear)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: AttentionContext,
        cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x` is the previous layer's MLP output and `residual` the stream it adds to (for the
        first layer: the embeddings and None). Returns this layer's pair. Each add is done with
        the norm that follows it, so on CPU both run in one kernel call."""
        if residual is None:
            residual, h = x, self.input_norm(x)
        else:
            residual, h = self.input_norm.add_and_norm(residual, x)
        residual, h = self.post_attn_norm.add_and_norm(residual, self.attn(h, cos, sin, ctx, cache))
        return self.mlp(h, ctx), residual


# Runs every layer of a decode-only step in one call: (embeddings, cos, sin, ctx, cache) ->
# (last MLP output, residual), exactly as the layer loop would (engine/decode_stack.py).
LayerStack = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext, KVCache], tuple[torch.Tensor, torch.Tensor]
]


class Q8Embedding(nn.Module):
    """The token embedding read from the GGUF's Q8_0 blocks, row by row, in `dtype`: the dense
    table's values (the same bits: it is those blocks dequantized and rounded to `dtype`) in a
    quarter (fp32) or half (bf16) of its bytes, where nothing else reads that table after the load
    (engine/factory.py). A tied Q8_0 lm_head shares the blocks."""

    def __init__(self, q8: quant.Q8Weight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.q8 = q8
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q8.rows(ids).to(self.dtype)


class LlamaForCausalLM(nn.Module):
    """Built with its linears made by `make_linear` from the loaded weights and, if given, its
    `embedding`; else the embedding (on `meta` until then: no random init) is loaded with the
    norms by `load_state_dict(assign=True)` (engine/factory.py)."""

    def __init__(self, args: LlamaArgs, make_linear: MakeLinear, embedding: nn.Module | None = None) -> None:
        super().__init__()
        self.args = args
        placeholder = torch.empty(args.vocab_size, args.hidden_size, device="meta")  # no random init
        self.embed_tokens = embedding or nn.Embedding(args.vocab_size, args.hidden_size, _weight=placeholder)
        self.layers = nn.ModuleList(DecoderLayer(args, i, make_linear) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = make_linear("lm_head")
        self.rotary = RotaryEmbedding(
            args.head_dim, args.rope_theta, args.max_position_embeddings, args.rope_scaling
        )

    def forward(
        self, input_ids: torch.Tensor, ctx: AttentionContext, cache: KVCache, stack: LayerStack | None = None
    ) -> torch.Tensor:
        """Logits (fp32) `[len(ctx.logits_rows), vocab]` for a flat batch `input_ids` `[N]`.
        `stack` runs the layers instead of the loop on steps whose path says so (`ctx.path.stack`).

        Only the rows that sample a token (a sequence's last token) need logits, so the (large)
        vocabulary projection skips every other row.
        """
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(ctx.positions, x.dtype)
        path = ctx.path
        if stack is not None and path.stack:
            x, residual = stack(x, cos, sin, ctx, cache)
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer(x, residual, cos, sin, ctx, cache)
        if residual is not None:
            x = residual + x  # the last layer's MLP output joins the stream
        if ctx.logits_rows is not None:
            x = x[ctx.logits_rows]
            if x.shape[0] == 0:  # only mid-prompt chunks this step: nothing to sample
                return x.new_empty((0, self.args.vocab_size), dtype=torch.float32)
        return self.lm_head(self.norm(x), path.small_logits, path.split_rows).float()


def linear_weight_names(names: Collection[str], args: LlamaArgs) -> list[str]:
    """Which of a checkpoint's weights (`names`, fused or not) the model's linears read: every
    layer's projections, and the lm_head's (the embedding's table when they are tied)."""
    head = "embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight"
    return sorted(n for n in names if n == head or (n.startswith("layers.") and n.endswith("_proj.weight")))


def fuse_weights(
    weights: dict[str, torch.Tensor],
    quantized: dict[str, quant.SmallWeight],
    rounded: dict[str, int8.RoundedWeight],
) -> None:
    """Concatenate each layer's q/k/v and gate/up weights (and biases, their GGUF 4-bit copies:
    engine/quant.py, and their int8 forms: engine/int8.py) into the fused names the model is
    built with, in place."""
    layers = {name.split(".")[1] for name in (*weights, *rounded) if name.startswith("layers.")}
    for layer in layers:
        for fused, parts in FUSED.items():
            for suffix in ("weight", "bias"):
                names = [f"layers.{layer}.{part}.{suffix}" for part in parts]
                if names[0] in weights:
                    weights[f"layers.{layer}.{fused}.{suffix}"] = torch.cat([weights.pop(n) for n in names])
            names = [f"layers.{layer}.{part}.weight" for part in parts]
            quantized_copy = quant.concat([quantized.pop(n, None) for n in names])
            if quantized_copy is not None:
                quantized[f"layers.{layer}.{fused}.weight"] = quantized_copy
            rounded_copy = int8.concat([rounded.pop(n, None) for n in names])
            if rounded_copy is not None:
                rounded[f"layers.{layer}.{fused}.weight"] = rounded_copy
