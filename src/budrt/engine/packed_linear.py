"""bf16 linear layers with weights pre-packed for oneDNN (AMX / AVX512-BF16) once, at load.

`F.linear` on bf16 CPU tensors hands the weight to oneDNN in plain layout, which reorders it into
its blocked layout on every call. Packing once (what inductor's freezing pass does) cut the CPU
time of SmolLM2's matmuls by 20-60% in our measurements (decode batch 1 to 64), and the logits
matmul over the 49k vocabulary by about 2x. fp32 keeps plain `nn.Linear` (MKL is as fast there and
the tests compare fp32 outputs with transformers bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from budrt.engine import kernels, quant


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and hasattr(
            torch.ops.mkldnn, "_reorder_linear_weight"
        )
    except (AttributeError, RuntimeError):
        return False


@dataclass
class SmallWeights:
    """Whether the current step may use the small weight copies; the runner sets it each step.

    The 4-bit (or int8) weights approximate the file's values differently from bf16, so a row's
    logits depend on which copy computed it. Only steps that decode a few unseeded streams use
    them: a seeded request, or a prompt being prefilled, always takes the bf16 path, whatever else
    shares its step — the same seed gives the same output under any batch mix.

    For the same reason a step with a seeded request runs its bf16 linears `EXACT_ROWS` rows at a
    time (`exact`): oneDNN rounds a row of some shapes (SmolLM2's fused q/k/v, the vocabulary
    projection) differently above 32 rows than at 1 to 32, so a seeded row computed in a bigger
    step would not match the same row computed alone."""

    allowed: bool = True
    exact: bool = False


EXACT_ROWS = 32


# Steps of at most this many rows use a Q8_0 copy: above it, widening the 8-bit values costs
# more than the bytes saved (lm_head alone, warm caches: 1 row 1.6 vs 1.9 ms, 8 rows 3.7 vs 2.5).
Q8_ROWS = 4


class PackedLinear(nn.Module):
    """Small steps (one or a few decoding streams) are bound by reading the weights from memory,
    so they may use a smaller copy of them:
    - `q4_rows > 0` and the linear carries the GGUF's own 4-bit weights (`linear.q4`, see
      engine/quant.py): steps of at most `q4_rows` rows use them; same weight values as the file,
      a quarter of the bytes of bf16 (about 4x faster matmuls at one row here);
    - likewise with the GGUF's Q8_0 weights (`linear.q8`: SmolLM2's tied lm_head), through the
      C++ kernel (csrc/q8_linear.cpp), for steps of at most `Q8_ROWS` rows: half the bytes;
    - else `int8_rows > 0` keeps a weight-only int8 copy (per output channel scales) for steps of
      at most that many rows: half the bytes, slightly different outputs, so it is opt-in.
    Larger steps are compute bound and use the packed bf16 weights (AMX)."""

    def __init__(
        self,
        linear: nn.Linear,
        batch_hint: int = 64,
        int8_rows: int = 0,
        q4_rows: int = 0,
        small_weights: SmallWeights | None = None,
    ) -> None:
        super().__init__()
        self.small_weights = small_weights or SmallWeights()
        weight = linear.weight.detach().contiguous()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        q4 = getattr(linear, "q4", None)
        self.q4_rows = q4_rows if q4 is not None and quant.fits(q4) else 0
        if self.q4_rows:
            self.q4_weight, self.q4_scales = quant.pack(q4, weight.dtype)
            int8_rows = 0
        q8 = getattr(linear, "q8", None)
        self.q8: quant.Q8Weight | None = q8 if q4_rows and not self.q4_rows else None
        self.q8_rows = min(q4_rows, Q8_ROWS) if self.q8 is not None else 0
        if self.q8_rows:
            int8_rows = 0
        self.small_rows = max(self.q4_rows, self.q8_rows, int8_rows)
        self.int8_rows = int8_rows
        if int8_rows:
            w = weight.float()
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
            self.qweight = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            self.qscale = scale.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or not x.is_contiguous():
            shape = x.shape
            out = self.forward(x.reshape(-1, self.in_features).contiguous())
            return out.view(*shape[:-1], self.out_features)
        # The engine's flat `[N, hidden]` batch goes straight to the kernels: a decode step runs
        # ~120 linears, and every extra op costs microseconds at batch 1.
        rows = x.shape[0]
        if rows <= self.small_rows and self.small_weights.allowed:
            out = self._small(x, rows)
            if out is not None:
                return out if self.bias is None else out + self.bias
        if self.small_weights.exact and rows > EXACT_ROWS:
            parts = [
                torch.ops.mkldnn._linear_pointwise(part, self.weight, self.bias, "none", [], "")
                for part in x.split(EXACT_ROWS)
            ]
            return torch.cat(parts)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def _small(self, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """x @ W^T on the small copy (no bias); None where its C++ kernel is not built."""
        if self.q8 is not None:  # rows <= q8_rows here
            return kernels.q8_linear(x, self.q8.values, self.q8.scales)
        if rows <= self.q4_rows:
            return quant.matmul(x, self.q4_weight, self.q4_scales)
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.qscale)


def pack_linears(model: nn.Module, int8_rows: int = 0, q4_rows: int = 0) -> SmallWeights:
    """Replace every `nn.Linear` in `model` by a `PackedLinear`; returns the switch they share."""
    switch = SmallWeights()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                packed = PackedLinear(child, int8_rows=int8_rows, q4_rows=q4_rows, small_weights=switch)
                setattr(module, child_name, packed)
    return switch
