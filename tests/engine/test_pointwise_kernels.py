"""The C++ SiLU(gate) * up and greedy argmax against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from budrt.engine import kernels


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")


@pytest.mark.parametrize("rows,width", [(1, 1536), (5, 1536), (33, 1536), (3, 100)])
def test_silu_mul_matches_torch(rows: int, width: int) -> None:
    torch.manual_seed(rows)
    gate_up = (4 * torch.randn(rows, 2 * width)).to(torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    reference = F.silu(gate) * up
    ours = kernels.silu_mul(gate_up)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, width)
    # Same formula and roundings; ATen's vector exp and libm's may differ in the last fp32 bit,
    # which reaches the bf16 result only on rare elements.
    assert (ours == reference).float().mean() > 0.999
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("rows,width", [(1, 1536), (5, 1536), (3, 100), (2, 13)])
def test_fp32_silu_mul_is_torchs(rows: int, width: int) -> None:
    torch.manual_seed(rows)
    gate_up = 4 * torch.randn(rows, 2 * width)
    gate, up = gate_up.chunk(2, dim=-1)
    ours = kernels.silu_mul(gate_up)
    assert ours.dtype == torch.float32 and ours.shape == (rows, width)
    # ATen's silu loop in fp32: the same vector formula (and partial vectors for the tail).
    torch.testing.assert_close(ours, F.silu(gate) * up, rtol=2e-7, atol=1e-7)


def test_silu_mul_refuses_bad_input() -> None:
    with pytest.raises(RuntimeError, match="silu_mul"):
        kernels.silu_mul(torch.randn(2, 8).double())
    with pytest.raises(RuntimeError, match="silu_mul"):
        kernels.silu_mul(torch.randn(2, 7).to(torch.bfloat16))  # odd width


@pytest.mark.parametrize("rows,width", [(1, 49152), (64, 49152), (3, 5), (7, 33)])
def test_argmax_matches_torch(rows: int, width: int) -> None:
    torch.manual_seed(width)
    logits = torch.randn(rows, width)
    # Ties: the first index of the maximum wins, as in torch.
    logits[0, width // 2] = logits[0, width - 1] = 100.0
    tokens = kernels.argmax_rows(logits)
    assert tokens is not None and tokens.dtype == torch.long
    assert torch.equal(tokens, logits.max(dim=-1).indices)
    assert int(tokens[0]) == width // 2


def test_argmax_nan_and_infinities_follow_torch() -> None:
    logits = torch.full((4, 40), -float("inf"))
    logits[1, 7] = float("nan")
    logits[1, 30] = float("nan")
    logits[2, 39] = float("nan")  # in the scalar tail
    logits[3, 3] = float("inf")
    tokens = kernels.argmax_rows(logits)
    assert tokens is not None
    assert tokens.tolist() == logits.max(dim=-1).indices.tolist() == [0, 7, 39, 3]


def test_argmax_declines_what_it_does_not_handle() -> None:
    assert kernels.argmax_rows(torch.randn(2, 10).to(torch.bfloat16)) is None
    assert kernels.argmax_rows(torch.randn(10, 2).t()) is None  # rows not contiguous
    sliced = torch.randn(4, 20)[:, 2:15]  # strided rows with contiguous elements are fine
    tokens = kernels.argmax_rows(sliced)
    assert tokens is not None and torch.equal(tokens, sliced.max(dim=-1).indices)
