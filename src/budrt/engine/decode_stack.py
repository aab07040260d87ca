"""All decoder layers of a small decode-only step in one C++ call (csrc/decode_stack.cpp).

At one to a few decoding rows on the GGUF's 4-bit weights, a layer's arithmetic is about as
cheap as walking it in Python. When a step qualifies, `LlamaForCausalLM.forward` hands the whole
layer loop to the kernel, which runs the same ops in the same order through the same kernels, so
the tokens are exactly those of the Python layers (tested). A step qualifies when:
- every row decodes one token (no prefill chunk), and there are at most `q4_rows` rows;
- the step may use the small weights (`SmallWeights.allowed`: no seeded request in it);
- activations and cache are bf16 on CPU and the extension is loaded.
Models with QK-norm or q/k/v biases (Qwen) keep the Python layers.
"""

from __future__ import annotations

import torch

from budrt.engine import kernels
from budrt.engine.attention import AttentionContext
from budrt.engine.kv_cache import KVCache
from budrt.engine.packed_linear import PackedLinear, SmallWeights


class Q4DecodeStack:
    def __init__(
        self,
        norms: list[torch.Tensor],
        packed: list[torch.Tensor],
        scales: list[torch.Tensor],
        rows: int,
        small_weights: SmallWeights,
        num_heads: int,
        head_dim: int,
        eps: float,
    ) -> None:
        self.norms = norms
        self.packed = packed
        self.scales = scales
        self.rows = rows
        self.small_weights = small_weights
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self.eps = eps

    @classmethod
    def build(cls, model: torch.nn.Module) -> Q4DecodeStack | None:
        """The stack for a packed Llama model (`LlamaForCausalLM`), or None if any layer does
        not fit the kernel (a linear without 4-bit weights, QK-norm, biases, non-bf16 norms)."""
        norms: list[torch.Tensor] = []
        packed: list[torch.Tensor] = []
        scales: list[torch.Tensor] = []
        rows: set[int] = set()
        switches: set[int] = set()
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            if attn.qk_norm:
                return None
            linears = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
            for linear in linears:
                if not isinstance(linear, PackedLinear) or not linear.q4_rows or linear.bias is not None:
                    return None
                packed.append(linear.q4_weight)
                scales.append(linear.q4_scales)
                rows.add(linear.q4_rows)
                switches.add(id(linear.small_weights))
            for norm in (layer.input_norm, layer.post_attn_norm):
                if norm.weight.dtype != torch.bfloat16:
                    return None
                norms.append(norm.weight.detach())
        if len(rows) != 1 or len(switches) != 1 or not model.layers:
            return None
        first = model.layers[0]
        return cls(
            norms,
            packed,
            scales,
            rows.pop(),
            first.attn.qkv_proj.small_weights,
            first.attn.num_heads,
            first.attn.head_dim,
            first.input_norm.eps,
        )

    def applies(self, x: torch.Tensor, ctx: AttentionContext, cache: KVCache) -> bool:
        return (
            ctx.decode_only
            and x.shape[0] <= self.rows
            and self.small_weights.allowed
            and kernels.use_fused_decode(x, cache.data)
        )

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last layer's MLP output, residual stream) for embeddings `x` `[N, hidden]`."""
        n = x.shape[0]
        assert ctx.decode_block_tables is not None and ctx.decode_lengths is not None
        return kernels.q4_decode_layers(
            x,
            cos.view(n, -1),
            sin.view(n, -1),
            cache.data,
            ctx.slots,
            ctx.decode_block_tables,
            ctx.decode_lengths,
            self.norms,
            self.packed,
            self.scales,
            self.num_heads,
            self.scale,
            self.eps,
        )
