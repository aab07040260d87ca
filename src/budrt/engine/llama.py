"""A Llama-family decoder (Llama, SmolLM, Mistral; Qwen2 via q/k/v biases) in plain PyTorch.

The math follows transformers' `LlamaForCausalLM` (rotate_half RoPE, RMSNorm computed in fp32) so
greedy outputs match it token for token. The only engine-specific part is attention: every layer
writes its keys/values into the engine's KV cache and attends over it, as told by an
`AttentionContext` that the model runner builds once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from budrt.engine.kv_cache import KVCache


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


@dataclass
class AttentionContext:
    """How this forward's tokens relate to the KV cache.

    Prefill: one sequence, `input_ids` is `[1, T]`, positions `0..T-1`, written to cache slot
    `slots[0]`; attention is causal over the prompt itself.
    Decode: `input_ids` is `[B, 1]`, one new token per sequence at `positions[b]`; each row attends
    over its slot's first `positions[b] + 1` cached entries (`mask`, `[B, 1, 1, kv_len]`).
    """

    is_prefill: bool
    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, T] long
    kv_len: int  # cache entries the decode attends over (max position + 1)
    mask: torch.Tensor | None = None  # decode only
    packed: bool = False  # decode: slots are exactly 0..B-1, so the cache can be sliced, not gathered


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 like transformers does: bf16 variance loses too much precision.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for all positions, computed once in fp32 and looked up per token."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, T, D] -> [B, 1, T, D] to broadcast over heads.
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: AttentionContext,
        cache: KVCache,
    ) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        q = self.q_proj(x).view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        if ctx.is_prefill:
            cache.write_prefill(self.layer_idx, int(ctx.slots[0]), k[0], v[0])
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            cache.write_decode(self.layer_idx, ctx.slots, ctx.positions[:, 0], k[:, :, 0], v[:, :, 0])
            keys, values = cache.gather(self.layer_idx, ctx.slots, ctx.kv_len, ctx.packed)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = Attention(args, layer_idx)
        self.post_attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext, cache: KVCache
    ) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, ctx, cache)
        return x + self.mlp(self.post_attn_norm(x))


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
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta, args.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, ctx: AttentionContext, cache: KVCache) -> torch.Tensor:
        """Logits (fp32) of the last token of each row: `[B, vocab]`.

        Only the last position's logits are ever needed for sampling, so the (large) vocabulary
        projection runs on one token per row instead of the whole prompt.
        """
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(ctx.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx, cache)
        x = self.norm(x[:, -1, :])
        return self.lm_head(x).float()
