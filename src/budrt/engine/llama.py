"""A Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2 q/k/v biases, Qwen3 QK-norm) in PyTorch.

The math follows transformers' `LlamaForCausalLM` (rotate_half RoPE, RMSNorm computed in fp32) so
greedy outputs match it token for token. The only engine-specific part is attention: every layer
writes its keys/values into the engine's KV cache and attends over it, as told by an
`AttentionContext` that the model runner builds once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from budrt.engine import kernels, quant
from budrt.engine.attention import AttentionContext, paged_attention
from budrt.engine.decode_stack import DecodeStack
from budrt.engine.kv_cache import KVCache
from budrt.engine.packed_linear import SmallWeights
from budrt.engine.rope import rope_attention_factor, rope_inv_freq


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
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections()
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
        n = x.shape[0]
        if self.qkv_proj is not None and not self.qk_norm:
            # Fused at load: one matmul instead of three, and q and k (adjacent in its output)
            # get RoPE in one go, which halves the per-layer elementwise ops.
            qkv = self.qkv_proj(x)
            qk_width = self.qkv_sizes[0] + self.qkv_sizes[1]
            v = qkv[:, qk_width:].view(n, self.num_kv_heads, self.head_dim)
            if kernels.use_fused_rope(qkv, cache.data):
                # bf16 on CPU: RoPE and cache write in one C++ call (same math), and for a
                # decode-only step the attention too.
                keys, values = cache.layer(self.layer_idx)
                if not ctx.decode_only:
                    q, k = kernels.rope_cache_write(
                        qkv, cos.view(n, -1), sin.view(n, -1), keys, values, ctx.slots, self.num_heads
                    )
                    return self.o_proj(paged_attention(q, k, v, ctx, cache, self.layer_idx, written=True))
                assert ctx.decode_block_tables is not None and ctx.decode_lengths is not None
                attended = kernels.rope_cache_decode_attention(
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
                return self.o_proj(attended)
            qk = apply_rope(qkv[:, :qk_width].view(n, -1, self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            return self.o_proj(paged_attention(q, k, v, ctx, cache, self.layer_idx))
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # per head, over head_dim (the last axis), before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        return self.o_proj(paged_attention(q, k, v, ctx, cache, self.layer_idx))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if kernels.use_silu_kernel(gate_up):
                # bf16 on CPU: one pass, same roundings (csrc/silu_mul.cpp).
                return self.down_proj(kernels.silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = Attention(args, layer_idx)
        self.post_attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

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
        the norm that follows it, so bf16 on CPU runs both in one kernel call."""
        if residual is None:
            residual, h = x, self.input_norm(x)
        else:
            residual, h = self.input_norm.add_and_norm(residual, x)
        residual, h = self.post_attn_norm.add_and_norm(residual, self.attn(h, cos, sin, ctx, cache))
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(
            args.head_dim, args.rope_theta, args.max_position_embeddings, args.rope_scaling
        )
        # Set when the linears are packed with small (4-bit/int8) weight copies: the runner
        # decides per step whether they may be used.
        self.small_weights: SmallWeights | None = None
        # Set with them when every layer fits the one-call kernel for decode-only steps.
        self.decode_stack: DecodeStack | None = None

    def forward(self, input_ids: torch.Tensor, ctx: AttentionContext, cache: KVCache) -> torch.Tensor:
        """Logits (fp32) `[len(ctx.logits_rows), vocab]` for a flat batch `input_ids` `[N]`.

        Only the rows that sample a token (a sequence's last token) need logits, so the (large)
        vocabulary projection skips every other row.
        """
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(ctx.positions, x.dtype)
        residual = None
        stack = self.decode_stack
        stack_weights = stack.weights_for(x, ctx, cache) if stack is not None else None
        if stack is not None and stack_weights is not None:
            x, residual = stack(stack_weights, x, cos, sin, ctx, cache)
        else:
            for layer in self.layers:
                x, residual = layer(x, residual, cos, sin, ctx, cache)
        if residual is not None:
            x = residual + x  # the last layer's MLP output joins the stream
        if ctx.logits_rows is not None:
            x = x[ctx.logits_rows]
            if x.shape[0] == 0:  # only mid-prompt chunks this step: nothing to sample
                return x.new_empty((0, self.args.vocab_size), dtype=torch.float32)
        return self.lm_head(self.norm(x)).float()


def fuse_projections(model: LlamaForCausalLM) -> None:
    """Concatenate q/k/v and gate/up weights so each layer runs 2 matmuls fewer per step; the
    separate modules are dropped (same math, same outputs). Their 4-bit copies (`.q4`, see
    engine/quant.py) are concatenated alike."""
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        qkv = nn.Linear(1, 1, bias=attn.q_proj.bias is not None)  # placeholder, weights set below
        qkv.weight = nn.Parameter(
            torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), False
        )
        if attn.q_proj.bias is not None:
            qkv.bias = nn.Parameter(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]), False)
        attn.qkv_proj = qkv
        qkv.q4 = quant.concat([getattr(m, "q4", None) for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
        del attn.q_proj, attn.k_proj, attn.v_proj
        gate_up = nn.Linear(1, 1, bias=False)
        gate_up.weight = nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), False)
        for fused in (qkv, gate_up):
            fused.out_features, fused.in_features = fused.weight.shape
        mlp.gate_up_proj = gate_up
        gate_up.q4 = quant.concat([getattr(m, "q4", None) for m in (mlp.gate_proj, mlp.up_proj)])
        del mlp.gate_proj, mlp.up_proj
