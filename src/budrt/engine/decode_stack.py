"""All decoder layers of a decode-only step in one C++ call (csrc/decode_stack.cpp).

Walking a layer in Python costs about as much as its arithmetic at one to a few decoding rows,
and still ~0.3 ms a layer at 64 rows, with one of the two CPUs idle meanwhile. When a step
qualifies, `LlamaForCausalLM.forward` hands the whole layer loop to the kernel, which runs the
same ops in the same order through the same kernels, so the tokens are exactly those of the
Python layers (tested). A step qualifies when every row decodes one token (no prefill chunk),
activations and cache are bf16 on CPU and the extension is loaded; then its linears are
- the GGUF's 4-bit weights ("q4") when the Python layers would take them too: at
  most `q4_rows` rows and the small weights allowed (`SmallWeights`: no seeded request);
- else the packed bf16 weights ("bf16"), unless some linear would take another
  small copy (int8 or Q8_0) at this row count, or a seeded request shares a step of more than
  `EXACT_ROWS` rows (SmallWeights.exact): such steps keep the Python layers.
Models with QK-norm or biases (Qwen) keep the Python layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from budrt.engine import kernels
from budrt.engine.attention import AttentionContext
from budrt.engine.kv_cache import KVCache
from budrt.engine.packed_linear import EXACT_ROWS, PackedLinear, SmallWeights


@dataclass
class Q4Weights:
    packed: list[torch.Tensor]  # 4 per layer: qkv, o, gate_up, down (quant.pack's layout)
    scales: list[torch.Tensor]
    rows: int  # steps of at most this many rows use them (PackedLinear.q4_rows)


class DecodeStack:
    def __init__(
        self,
        norms: list[torch.Tensor],
        bf16_weights: list[torch.Tensor],
        q4: Q4Weights | None,
        small_rows: int,
        small_weights: SmallWeights,
        num_heads: int,
        head_dim: int,
        eps: float,
    ) -> None:
        self.norms = norms
        self.bf16_weights = bf16_weights
        self.q4 = q4
        self.small_rows = small_rows  # at most this many rows, some linear may take a small copy
        self.small_weights = small_weights
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self.eps = eps

    @classmethod
    def build(cls, model: torch.nn.Module) -> DecodeStack | None:
        """The stack for a packed Llama model (`LlamaForCausalLM`), or None if any layer does
        not fit the kernel (an unpacked linear, QK-norm, biases, non-bf16 norms)."""
        norms: list[torch.Tensor] = []
        linears: list[PackedLinear] = []
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            if attn.qk_norm:
                return None
            for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                if not isinstance(linear, PackedLinear) or linear.bias is not None:
                    return None
                linears.append(linear)
            for norm in (layer.input_norm, layer.post_attn_norm):
                if norm.weight.dtype != torch.bfloat16:
                    return None
                norms.append(norm.weight.detach())
        if not linears or len({id(linear.small_weights) for linear in linears}) != 1:
            return None
        q4_rows = {linear.q4_rows for linear in linears}
        q4 = None
        if len(q4_rows) == 1 and min(q4_rows) > 0:
            q4 = Q4Weights(
                [linear.q4_weight for linear in linears],
                [linear.q4_scales for linear in linears],
                min(q4_rows),
            )
        first = model.layers[0]
        return cls(
            norms,
            [linear.weight for linear in linears],
            q4,
            max(linear.small_rows for linear in linears),
            linears[0].small_weights,
            first.attn.num_heads,
            first.attn.head_dim,
            first.input_norm.eps,
        )

    def weights_for(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache) -> str | None:
        """ "q4" or "bf16": which weights this step's layers take in the kernel; None to keep the
        Python layers."""
        if not ctx.decode_only or not kernels.use_fused_rope(x, cache.data):
            return None
        rows = x.shape[0]
        if self.small_weights.exact and rows > EXACT_ROWS:
            return None  # the Python layers split each linear (SmallWeights.exact)
        if rows > self.small_rows or not self.small_weights.allowed:
            return "bf16"
        if self.q4 is not None and rows <= self.q4.rows:
            return "q4"
        return None

    def __call__(
        self,
        weights: str,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: AttentionContext,
        cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last layer's MLP output, residual stream) for embeddings `x` `[N, hidden]`."""
        n = x.shape[0]
        assert ctx.decode_block_tables is not None and ctx.decode_lengths is not None
        q4 = self.q4 if weights == "q4" else None
        return kernels.decode_layers(
            weights,
            x,
            cos.view(n, -1),
            sin.view(n, -1),
            cache.data,
            ctx.slots,
            ctx.decode_block_tables,
            ctx.decode_lengths,
            self.norms,
            q4.packed if q4 is not None else self.bf16_weights,
            q4.scales if q4 is not None else [],
            self.num_heads,
            self.scale,
            self.eps,
        )
