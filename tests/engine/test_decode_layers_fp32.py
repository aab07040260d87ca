"""kernels.decode_layers in fp32 (the AVX2 machines' dtype): the one-call stack equals the same
kernels run layer by layer from Python, on dense and on 4-bit weights, with and without
split rows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from gguf_blocks import random_q4

from budrt.engine import kernels, quant
from budrt.engine.llama import RotaryEmbedding

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, DIM, BLOCK, EPS = 2, 64, 128, 4, 2, 16, 16, 1e-5


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")


def layer_weights() -> tuple[list[torch.Tensor], list[quant.Q4Weight]]:
    """Norm weights (2 per layer) and the 4 linears per layer (qkv, o, gate_up, down), in 4 bits."""
    qkv = (HEADS + 2 * KV_HEADS) * DIM
    shapes = [(qkv, HIDDEN), (HIDDEN, HEADS * DIM), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
    norms = [1 + 0.1 * torch.randn(HIDDEN) for _ in range(2 * LAYERS)]
    return norms, [random_q4(*shapes[i % 4], seed=i, scale=0.2) for i in range(4 * LAYERS)]


def step(rows: int) -> dict[str, torch.Tensor]:
    """A decode step of `rows` sequences with some history in a random fp32 cache."""
    lengths = torch.tensor([1 + 7 * i for i in range(rows)])
    tables = torch.arange(rows * 4).view(rows, 4)  # 4 blocks each
    positions = lengths - 1
    slots = torch.stack([tables[i, p // BLOCK] * BLOCK + p % BLOCK for i, p in enumerate(positions.tolist())])
    cos, sin = RotaryEmbedding(DIM, 10000.0, 256)(positions, torch.float32)
    cache = torch.randn(LAYERS, 2, rows * 4, BLOCK, KV_HEADS, DIM)
    return {
        "x": torch.randn(rows, HIDDEN),
        "cos": cos.view(rows, -1),
        "sin": sin.view(rows, -1),
        "cache": cache,
        "slots": slots,
        "tables": tables,
        "lengths": lengths,
    }


def python_layers(
    s: dict[str, torch.Tensor], norms: list[torch.Tensor], linear: Callable[[int, torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers walked from Python through the same kernels (llama.py's DecoderLayer order)."""
    hidden, residual = s["x"], s["x"]
    for layer in range(LAYERS):
        if layer == 0:
            normed = kernels.rms_norm(hidden, norms[0], EPS)
        else:
            residual, normed = kernels.add_rms_norm(residual, hidden, norms[2 * layer], EPS)
        keys, values = s["cache"][layer, 0], s["cache"][layer, 1]
        attended = kernels.rope_cache_decode_attention(
            linear(4 * layer, normed),
            s["cos"],
            s["sin"],
            keys,
            values,
            s["slots"],
            s["tables"],
            s["lengths"],
            HEADS,
            DIM**-0.5,
        )
        residual, normed = kernels.add_rms_norm(
            residual, linear(4 * layer + 1, attended), norms[2 * layer + 1], EPS
        )
        hidden = linear(4 * layer + 3, kernels.silu_mul(linear(4 * layer + 2, normed)))
    return hidden, residual


def run_stack(
    kind: str,
    s: dict[str, torch.Tensor],
    norms: list[torch.Tensor],
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    split: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.decode_layers` over the step `s` (from `step`)."""
    step_tensors = (s["x"], s["cos"], s["sin"], s["cache"], s["slots"], s["tables"], s["lengths"])
    return kernels.decode_layers(kind, *step_tensors, norms, weights, scales, HEADS, DIM**-0.5, EPS, split)


@pytest.mark.parametrize("kind", ["dense", "q4"])
@pytest.mark.parametrize("rows,split", [(1, 0), (5, 0), (5, 2)])
def test_fp32_stack_equals_the_kernels_layer_by_layer(kind: str, rows: int, split: int) -> None:
    torch.manual_seed(rows)
    norms, q4s = layer_weights()
    dense = [q4.dequantize() for q4 in q4s]
    tiles = [quant.pack_tiles(q4) for q4 in q4s]

    def linear(i: int, x: torch.Tensor) -> torch.Tensor:
        if kind == "q4":
            return kernels.q4_tiles_linear(x, *tiles[i])
        parts = x.split(split) if split else [x]
        return torch.cat([F.linear(part, dense[i]) for part in parts])

    ours_step = step(rows)
    reference_step = {name: value.clone() for name, value in ours_step.items()}
    weights = [t[0] for t in tiles] if kind == "q4" else dense
    scales = [t[1] for t in tiles] if kind == "q4" else []
    hidden, residual = run_stack(kind, ours_step, norms, weights, scales, split)
    expected_hidden, expected_residual = python_layers(reference_step, norms, linear)
    assert hidden.dtype == torch.float32 and hidden.shape == (rows, HIDDEN)
    assert torch.equal(hidden, expected_hidden) and torch.equal(residual, expected_residual)
    assert torch.equal(ours_step["cache"], reference_step["cache"])  # same keys and values written


def test_decode_layers_refuses_an_unknown_kind() -> None:
    norms, q4s = layer_weights()
    with pytest.raises(RuntimeError, match="kind"):
        run_stack("int8", step(1), norms, [q4.dequantize() for q4 in q4s], [], 0)
