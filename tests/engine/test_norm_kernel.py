"""The C++ RMSNorm (with the residual add fused in), bf16 and fp32, against the torch path it
replaces."""

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


def fp32_torch_path(weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """llama.py's fp32 RMSNorm (transformers' op order)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("rows", [1, 3, 17, 100])
def test_fp32_norm_and_add_follow_the_fp32_torch_path(norm: RMSNorm, rows: int) -> None:
    weight = norm.weight.float()
    x, delta = 3 * torch.randn(rows, HIDDEN), torch.randn(rows, HIDDEN)
    assert kernels.use_norm_kernel(x)
    ours = kernels.rms_norm(x, weight, norm.eps)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    # The same ops and roundings; only the sum of squares' order may differ (a few fp32 ulps).
    torch.testing.assert_close(ours, fp32_torch_path(weight, x, norm.eps), rtol=4e-7, atol=1e-7)
    total, normed = kernels.add_rms_norm(x, delta, weight, norm.eps)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, fp32_torch_path(weight, x + delta, norm.eps), rtol=4e-7, atol=1e-7)


def test_other_dtypes_and_layouts_take_the_torch_path(norm: RMSNorm) -> None:
    x16 = torch.randn(4, HIDDEN).to(torch.float16)
    assert not kernels.use_norm_kernel(x16)
    strided = torch.randn(HIDDEN, 4).to(torch.bfloat16).t()  # not contiguous
    torch.testing.assert_close(
        norm(strided).float(), torch_path(norm, strided).float(), rtol=2**-7, atol=1e-6
    )
    with pytest.raises(RuntimeError, match="x's dtype"):
        kernels.rms_norm(torch.randn(4, HIDDEN), norm.weight, norm.eps)  # fp32 x, bf16 weight
