"""bf16 linear layers with weights pre-packed for oneDNN (AMX / AVX512-BF16) once, at load.

`F.linear` on bf16 CPU tensors hands the weight to oneDNN in plain layout, which reorders it into
its blocked layout on every call. Packing once (what inductor's freezing pass does) cut the CPU
time of SmolLM2's matmuls by 20-60% in our measurements (decode batch 1 to 64), and the logits
matmul over the 49k vocabulary by about 2x. fp32 keeps plain `nn.Linear` (MKL is as fast there and
the tests compare fp32 outputs with transformers bit for bit).
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and hasattr(
            torch.ops.mkldnn, "_reorder_linear_weight"
        )
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """`int8_rows > 0` also keeps a weight-only int8 copy (per output channel scales) used when a
    step has at most that many rows: one decoding stream is bound by reading the weights from
    memory, and int8 halves the bytes. It changes outputs slightly, so it is opt-in."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 64, int8_rows: int = 0) -> None:
        super().__init__()
        weight = linear.weight.detach().contiguous()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.int8_rows = int8_rows
        if int8_rows:
            w = weight.float()
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
            self.qweight = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            self.qscale = scale.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > self.int8_rows and x.is_contiguous():
            # The engine's flat `[N, hidden]` batch: skip the reshapes (a decode step runs ~120
            # linears, and every extra op costs microseconds at batch 1).
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        shape = x.shape
        x = x.reshape(-1, self.in_features).contiguous()
        if x.shape[0] <= self.int8_rows:
            out = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.qscale)
            if self.bias is not None:
                out = out + self.bias
        else:
            out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return out.view(*shape[:-1], self.out_features)


def pack_linears(model: nn.Module, int8_rows: int = 0) -> int:
    """Replace every `nn.Linear` in `model` by a `PackedLinear`; returns how many were packed."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, PackedLinear(child, int8_rows=int8_rows))
                count += 1
    return count
