"""bf16 linears with oneDNN-packed weights (and the opt-in int8 path for tiny steps) compute the
same product as `F.linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budrt.engine.packed_linear import PackedLinear, can_pack

pytestmark = pytest.mark.skipif(
    not can_pack(torch.bfloat16, torch.device("cpu")), reason="no native bf16 on this CPU"
)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear, int8_rows=2)
    with torch.inference_mode():
        for rows in (1, 2, 3, 40):
            x = torch.randn(rows, 96, dtype=torch.bfloat16)
            ref = F.linear(
                x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float()
            )
            out = packed(x).float()
            assert out.shape == (rows, 160)
            # rows <= 2 run the int8 weights (~1% error), larger steps the exact bf16 weights.
            tolerance = 0.02 if rows <= 2 else 0.01
            assert ((out - ref).norm() / ref.norm()).item() < tolerance
            assert packed(x.view(rows, 1, 96)).shape == (rows, 1, 160)  # leading dims kept
