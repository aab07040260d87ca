"""A linear layer holding its weights in the forms its model's steps read, built whole at load.

- The dense weights, for prompt chunks and batched decode steps, in one of three forms: fp32 (or
  CUDA's dtype) for `F.linear`; bf16 on a CPU with bf16 dot products, packed once for oneDNN
  (`F.linear` would hand oneDNN the plain layout, which it reorders on every call: packing once
  cut SmolLM2's matmul time by 20-60% at 1-64 rows, the 49k-vocabulary logits by about 2x); or,
  for a GGUF model in fp32 on a CPU without bf16 dot products, int8 packed for FBGEMM
  (engine/int8.py: 1.8x fp32's speed at 64 rows, less memory), kept instead of fp32.
- The GGUF's own small copies, for decode steps bound by reading the weights (engine/quant.py):
  4-bit blocks repacked into tiles for csrc/q4_linear.cpp (a quarter of bf16's bytes), or the
  Q8_0 lm_head as stored (csrc/q8_linear.cpp).
Which form a step reads is decided once per step (engine/step_path.py) and passed in.

oneDNN builds (and caches) a primitive per input shape: its first call at a new row count took
~4 ms for one of SmolLM2's linears, and each cached one holds ~0.7 MB (JIT kernels; ideep's and
oneDNN's caches keep 1,024 each). Prompt chunks give a new row count at nearly every step, so a
server grew by ~0.3 GB and paid the builds all along. The packed linears therefore take their rows
padded to a few sizes (`onednn_rows`): 13 row counts up to 512.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from budrt.engine import int8, kernels, quant


@dataclass(frozen=True)
class LinearForms:
    """Which forms a model's linears keep; one decision per model (engine/factory.py)."""

    onednn: bool = False  # dense weights packed for oneDNN (bf16 on a CPU with bf16 dot products)
    int8: bool = False  # dense weights as int8 for FBGEMM, instead of fp32 (engine/int8.py)
    small: bool = False  # keep the GGUF's 4-bit / Q8_0 copies (CPU with the kernels loaded)


def onednn_rows(rows: int) -> int:
    """The row count a packed bf16 linear of `rows` rows runs at: 8, or the next power of two or
    1.5 times one (8, 12, 16, 24, 32, 48, 64, 96, ...). Padding costs ~10% over exact row counts with
    warm caches (bench: 17-512 rows, AMX), far less than building a primitive per row count. At
    most 32 rows it stays at most 32, where oneDNN gives a row the same bits at any row count
    (step_path.EXACT_ROWS). csrc/decode_stack.cpp pads by the same rule (a test compares them)."""
    if rows <= 8:
        return 8
    power = 1 << (rows - 1).bit_length()  # the next power of two >= rows
    return power * 3 // 4 if rows <= power * 3 // 4 else power


def onednn_packs(dtype: torch.dtype, device: torch.device, native_bf16: bool) -> bool:
    """Whether bf16 weights are packed for oneDNN: bf16 on a CPU that computes it natively."""
    packer = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    return dtype == torch.bfloat16 and device.type == "cpu" and native_bf16 and packer is not None


class Linear(nn.Module):
    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        forms: LinearForms,
        small: quant.SmallWeight | None = None,
        int8_weight: int8.Int8Weight | None = None,
    ) -> None:
        """With `forms.int8`, `int8_weight` is the dense form (the factory packs a model's all at
        once: engine/int8.pack) and `weight` may be None; without one, `weight` is rounded here."""
        super().__init__()
        self.onednn = forms.onednn
        self.int8_weight: int8.Int8Weight | None = None
        self.weight: nn.Parameter | None = None
        if forms.int8:
            if int8_weight is None:
                assert weight is not None, "a linear needs its weight or its int8 form"
                [int8_weight] = int8.pack([int8.round_weight(weight)])
            self.int8_weight = int8_weight
            self.out_features, self.in_features = int8_weight.out_features, int8_weight.in_features
        else:
            assert weight is not None, "a dense linear needs its weight"
            self.weight = _dense_weight(weight, forms.onednn)
            self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous(), False)
        self.q4_tiles: quant.Q4Tiles | None = None
        self.q8: quant.Q8Weight | None = None
        if forms.small and isinstance(small, quant.Q4Tiles):  # tiled by the gguf cache
            self.q4_tiles = small
        elif forms.small and isinstance(small, quant.Q4Weight) and quant.fits(small):
            self.q4_tiles = quant.pack_tiles(small)
        elif forms.small and isinstance(small, quant.Q8Weight):
            self.q8 = small

    @property
    def has_small(self) -> bool:
        return self.q4_tiles is not None or self.q8 is not None

    def forward(self, x: torch.Tensor, small: bool = False, split_rows: int = 0) -> torch.Tensor:
        """x @ W^T (+ b). `small`: read the small copy (when this linear has one); `split_rows`:
        dense matmuls of at most this many rows each (see step_path.EXACT_ROWS)."""
        if x.dim() != 2 or not x.is_contiguous():
            shape = x.shape
            out = self.forward(x.reshape(-1, self.in_features).contiguous(), small, split_rows)
            return out.view(*shape[:-1], self.out_features)
        if small and self.has_small:
            out = self._small(x)
            return out if self.bias is None else out + self.bias
        if split_rows and x.shape[0] > split_rows:
            return torch.cat([self._dense(part) for part in x.split(split_rows)])
        return self._dense(x)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_weight is not None:
            out = self.int8_weight(x)
            return out if self.bias is None else out + self.bias
        if self.onednn:
            rows, padded = x.shape[0], onednn_rows(x.shape[0])
            x = x if padded == rows else F.pad(x, (0, 0, 0, padded - rows))
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")[:rows]
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)

    def _small(self, x: torch.Tensor) -> torch.Tensor:
        if self.q4_tiles is not None:
            return kernels.q4_tiles_linear(x, *self.q4_tiles)
        assert self.q8 is not None
        return kernels.q8_linear(x, self.q8.values, self.q8.scales)


def _dense_weight(weight: torch.Tensor, onednn: bool) -> nn.Parameter:
    if onednn:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 64)
        return nn.Parameter(packed, requires_grad=False)
    # A tied lm_head passes the embedding's own Parameter: one tensor, moved once.
    return weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, False)
