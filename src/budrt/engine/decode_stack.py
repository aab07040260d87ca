"""All decoder layers of a decode-only step in one C++ call (csrc/decode_stack.cpp).

Walking a layer in Python costs about as much as its arithmetic at one to a few decoding rows,
and still ~0.3 ms a layer at 64 rows, with one of the two CPUs idle meanwhile. On steps whose
path says so (`StepPath.stack`: decode-only), `LlamaForCausalLM.forward` hands the layer loop to
the kernel, which runs the same ops in the same order through the same kernels, so the tokens are
exactly those of the Python layers (tested). The linears read the 4-bit tiles when the step's
path says `small`, else the dense weights (oneDNN-packed bf16, or fp32 through `at::linear`), in
pieces of at most `split_rows` rows for seeded steps (step_path.EXACT_ROWS).

A model fits when every layer is plain Llama (no QK-norm, no biases), its activations are fp32,
or bf16 with oneDNN-packed weights, and either every layer linear has 4-bit tiles or none has.
Where the dense weights are int8 (engine/int8.py) the stack runs the 4-bit steps only.
"""

from __future__ import annotations

import torch

from budrt.engine import kernels
from budrt.engine.attention import AttentionContext
from budrt.engine.kv_cache import KVCache
from budrt.engine.linear import Linear


class DecodeStack:
    def __init__(
        self,
        norms: list[torch.Tensor],
        linears: list[Linear],
        num_heads: int,
        head_dim: int,
        eps: float,
    ) -> None:
        self.norms = norms  # 2 per layer: input, post-attention
        # 4 per layer: qkv, o, gate_up, down; none where the dense form is int8 (4-bit steps only)
        self.dense = [linear.weight for linear in linears if linear.weight is not None]
        tiles = [linear.q4_tiles for linear in linears]
        self.q4_packed = [t[0] for t in tiles if t is not None]
        self.q4_scales = [t[1] for t in tiles if t is not None]
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self.eps = eps

    @classmethod
    def build(cls, model: torch.nn.Module) -> DecodeStack | None:
        """The stack over a loaded `LlamaForCausalLM`'s layers, or None if they do not fit. The
        caller builds it only where the CPU kernels are loaded (engine/factory.py)."""
        norms: list[torch.Tensor] = []
        linears: list[Linear] = []
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            if attn.qk_norm:
                return None
            linears += [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
            norms += [layer.input_norm.weight.detach(), layer.post_attn_norm.weight.detach()]
        dtype = norms[0].dtype
        if any(linear.bias is not None for linear in linears):
            return None
        if not (dtype == torch.float32 or (dtype == torch.bfloat16 and all(li.onednn for li in linears))):
            return None
        if len({linear.q4_tiles is not None for linear in linears}) != 1:
            return None
        weights = [linear.weight for linear in linears]
        int8_dense = all(w is None for w in weights)  # then the stack runs the 4-bit steps only
        if int8_dense and linears[0].q4_tiles is None:
            return None
        if not int8_dense and any(w is None or w.dtype != dtype for w in weights):
            return None
        first = model.layers[0]
        return cls(norms, linears, first.attn.num_heads, first.attn.head_dim, first.input_norm.eps)

    @property
    def has_small(self) -> bool:
        return bool(self.q4_packed)

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last layer's MLP output, residual stream) for embeddings `x` `[N, hidden]`."""
        n = x.shape[0]
        assert ctx.decode_block_tables is not None and ctx.decode_lengths is not None
        small = ctx.path.small and self.has_small
        return kernels.decode_layers(
            "q4" if small else "dense",
            x,
            cos.view(n, -1),
            sin.view(n, -1),
            cache.data,
            ctx.slots,
            ctx.decode_block_tables,
            ctx.decode_lengths,
            self.norms,
            self.q4_packed if small else self.dense,
            self.q4_scales if small else [],
            self.num_heads,
            self.scale,
            self.eps,
            ctx.path.split_rows,
        )
