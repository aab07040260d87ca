"""The C++ bf16 RMSNorm (with the residual add fused in) against the torch path it replaces."""

from __future__ import annotations

import pytest
import torch

from budrt.engine import kernels
from budrt.engine.llama import RMSNorm

HIDDEN = 576


@pytest.fixture(scope="module")
def norm() -> RMSNorm:
    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")
    torch.manual_seed(0)
    module = RMSNorm(HIDDEN, 1e-5)
    module.weight.data = (1 + 0.1 * torch.randn(HIDDEN)).to(torch.bfloat16)
    return module


def torch_path(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return norm.weight * torch.nn.functional.rms_norm(x.float(), (HIDDEN,), eps=norm.eps).to(x.dtype)


@pytest.mark.parametrize("rows", [1, 3, 17, 100])
def test_norm_matches_the_torch_path(norm: RMSNorm, rows: int) -> None:
    x = (3 * torch.randn(rows, HIDDEN)).to(torch.bfloat16)
    assert kernels.use_norm_kernel(x)
    ours, reference = norm(x), torch_path(norm, x)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    # Same math in the same order; only the fp32 sum of squares may round differently (by one
    # bf16 step at most, on a few elements).
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2**-7, atol=1e-6)
    assert (ours == reference).float().mean() > 0.99


def test_add_and_norm_returns_the_exact_sum_and_its_norm(norm: RMSNorm) -> None:
    x, delta = torch.randn(2, 9, HIDDEN).to(torch.bfloat16), torch.randn(2, 9, HIDDEN).to(torch.bfloat16)
    total, normed = norm.add_and_norm(x, delta)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed.float(), torch_path(norm, x + delta).float(), rtol=2**-7, atol=1e-6)


def test_other_dtypes_and_layouts_take_the_torch_path(norm: RMSNorm) -> None:
    x32 = torch.randn(4, HIDDEN)
    assert not kernels.use_norm_kernel(x32)
    strided = torch.randn(HIDDEN, 4).to(torch.bfloat16).t()  # not contiguous
    torch.testing.assert_close(
        norm(strided).float(), torch_path(norm, strided).float(), rtol=2**-7, atol=1e-6
    )
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.rms_norm(x32, norm.weight, norm.eps)
