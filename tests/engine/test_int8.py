"""engine/int8.py: int8 linears through FBGEMM, with per-row, Hadamard-rotated activations; each
row's result is the same bits whatever shares its call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from budrt.config import ModelConfig
from budrt.engine import cpu_features, int8, kernels
from budrt.engine.factory import create_text_engine
from budrt.engine.interface import SamplingParams
from budrt.engine.linear import Linear, LinearForms
from budrt.engine.llm_engine import LLMEngine
from budrt.engine.sequence import make_sequence

pytestmark = pytest.mark.skipif(not int8.available(), reason="this torch build has no FBGEMM")


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels() -> None:
    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")


def hadamard(block: int) -> torch.Tensor:
    """The orthonormal Hadamard matrix of a power-of-2 `block` (Sylvester's order)."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < block:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix / block**0.5


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact.double()).norm() / exact.double().norm()).item()


def activations(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Rows like an LLM's: mostly small values, a few channels 30x larger, rows of mixed size."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen) * torch.rand(rows, 1, generator=gen) * 3
    x[:, 7] *= 30
    x[:, width // 2 + 3] *= -20
    return x


def test_hadamard_block_is_the_largest_power_of_4_dividing_the_width() -> None:
    assert int8.hadamard_block(576) == 64 and int8.hadamard_block(1536) == 64
    assert int8.hadamard_block(48) == 16 and int8.hadamard_block(40) == 4 and int8.hadamard_block(42) == 1


@pytest.mark.parametrize("width", [576, 1536, 48, 42])
def test_int8_linear_is_close_to_fp32_on_rows_with_large_channels(width: int) -> None:
    torch.manual_seed(1)
    weight = torch.randn(320, width) * 0.05
    x = activations(64, width)
    out = int8.pack([int8.round_weight(weight)])[0](x)
    assert out.shape == (64, 320) and out.dtype == torch.float32
    # 7-bit activations: the rotation keeps the large channels from taking the other levels.
    limit = 0.03 if int8.hadamard_block(width) >= 16 else 0.12
    assert relative_error(out, F.linear(x, weight)) < limit


def test_the_weight_is_rotated_as_the_rows_are_and_rounded_per_output_row() -> None:
    torch.manual_seed(4)
    weight = torch.randn(48, 576) * 0.05
    weight[:, 9] *= 25  # a large input channel: the rotation spreads it over its block
    unpacked, _ = torch.ops.quantized.linear_unpack(int8.pack([int8.round_weight(weight)])[0].pieces[0])
    rotated = (weight.view(-1, 64) @ hadamard(64)).view_as(weight)
    scales = rotated.abs().amax(1) / 127
    assert torch.allclose(unpacked.q_per_channel_scales().float(), scales, rtol=1e-5)
    expected = torch.round(rotated / scales[:, None])
    assert (unpacked.int_repr().float() - expected).abs().max() <= 1  # summation order aside
    assert unpacked.int_repr().abs().amax(1).eq(127).all()


def test_the_rotation_helps_rows_with_large_channels() -> None:
    torch.manual_seed(2)
    weight, x = torch.randn(256, 576) * 0.05, activations(32, 576)
    ref = F.linear(x, weight)
    levels, scales = kernels.quantize_rows(x, 1, int8.activation_levels())  # the same rounding, not rotated
    weight_scales = weight.abs().amax(1, keepdim=True) / 127
    unrotated = F.linear(levels * scales, torch.round(weight / weight_scales) * weight_scales)
    assert relative_error(int8.pack([int8.round_weight(weight)])[0](x), ref) < 0.6 * relative_error(
        unrotated, ref
    )


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_each_row_is_the_same_bits_alone_and_in_any_batch(rows: int) -> None:
    torch.manual_seed(3)
    weight = int8.pack([int8.round_weight(torch.randn(960, 576) * 0.05)])[0]
    x = activations(rows, 576, seed=rows)
    together = weight(x)
    for r in {0, rows // 2, rows - 1}:
        assert torch.equal(weight(x[r : r + 1].contiguous()), together[r : r + 1])
    if rows > 4:
        split = torch.cat([weight(x[:3].contiguous()), weight(x[3:].contiguous())])
        assert torch.equal(split, together)


def test_quantize_rows_gives_integer_levels_and_row_scales() -> None:
    x = activations(5, 128)
    x[2] = 0.0  # an all-zero row: zero levels, no NaN
    levels, scales = kernels.quantize_rows(x, 64, int8.activation_levels())
    assert levels.shape == x.shape and scales.shape == (5, 1)
    assert torch.equal(levels, levels.round()) and levels.abs().max() == int8.activation_levels()
    assert torch.all(levels[2] == 0) and torch.isfinite(scales).all()
    rotated = (x.view(-1, 64) @ hadamard(64)).view_as(x)
    assert torch.allclose(levels * scales, rotated, atol=float(scales.max()) * 0.51)


def _quantize_rows_in_torch(x: torch.Tensor, block: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in elementwise torch ops, in its order: each butterfly pass's sums
    and differences, the 1/sqrt(block) scale, the row's largest value, rounding half to even."""
    y = x.reshape(-1, block).clone()
    half = 1
    while half < block:
        pairs = y.view(-1, block // (2 * half), 2, half)
        a, b = pairs[:, :, 0, :].clone(), pairs[:, :, 1, :].clone()
        pairs[:, :, 0, :], pairs[:, :, 1, :] = a + b, a - b
        half *= 2
    y = (y * (1.0 / block**0.5)).view_as(x)
    scales = (y.abs().amax(dim=1, keepdim=True) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(y / scales), scales


@pytest.mark.parametrize(
    ("rows", "width", "block"), [(3, 576, 64), (70, 1536, 64), (5, 96, 16), (4, 20, 4), (2, 13, 1)]
)
def test_quantize_rows_is_the_same_bits_as_its_arithmetic_one_value_at_a_time(
    rows: int, width: int, block: int
) -> None:
    """The vector passes (pairs within a vector by lane swaps, a scalar tail) change no bit."""
    x = activations(rows, width, seed=rows)
    levels, scales = kernels.quantize_rows(x, block, 127)
    expected_levels, expected_scales = _quantize_rows_in_torch(x, block, 127)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(levels, expected_levels)


@pytest.mark.parametrize(
    ("x", "block", "levels"),
    [
        (torch.zeros(2, 48, dtype=torch.bfloat16), 16, 63),  # not fp32
        (torch.zeros(2, 48), 32, 63),  # not a power of 4
        (torch.zeros(2, 40), 16, 63),  # does not divide the width
        (torch.zeros(2, 48), 16, 200),  # more levels than int8 has
        (torch.zeros(48), 16, 63),  # not 2-d
    ],
)
def test_quantize_rows_refuses_bad_arguments(x: torch.Tensor, block: int, levels: int) -> None:
    with pytest.raises(RuntimeError, match="quantize_rows"):
        kernels.quantize_rows(x, block, levels)


@pytest.mark.parametrize("bias", [False, True])
def test_an_int8_linear_keeps_no_fp32_weights_and_adds_its_bias(bias: bool) -> None:
    torch.manual_seed(4)
    weight, b = torch.randn(160, 96) * 0.05, torch.randn(160) if bias else None
    linear = Linear(weight, b, LinearForms(int8=True))
    assert linear.weight is None and linear.int8_weight is not None
    x = activations(9, 96)
    with torch.inference_mode():
        out = linear(x)
        assert out.shape == (9, 160)
        assert relative_error(out, F.linear(x, weight, b)) < 0.03
        assert torch.equal(linear(x, split_rows=4), out)  # any split: the same bits
        assert linear(x.view(9, 1, 96)).shape == (9, 1, 160)


def _smollm2(gguf_path: Path, **overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "name": "smollm2",
        "task": "chat",
        "format": "gguf",
        "source": str(gguf_path),
        "dtype": "float32",
        "max_model_len": 256,
        "max_num_seqs": 8,
        "kv_cache_bytes": 16 * 1024**2,
    }
    return ModelConfig(**(fields | overrides))


def test_a_gguf_model_in_fp32_reads_int8_weights_and_answers(gguf_path: Path) -> None:
    engine = create_text_engine(_smollm2(gguf_path))
    assert isinstance(engine, LLMEngine)
    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(linear.weight is None and linear.int8_weight is not None for linear in linears)
    assert engine.runner.rule.dense_int8 and "int8" in engine.runtime["weights"]
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    out: list[int] = []
    seq = make_sequence("paris", ids, SamplingParams(max_tokens=12, temperature=0.0), tok, 256,
                        engine.vocab_size, lambda o: out.extend(o.token_ids))  # fmt: skip
    engine.scheduler.add(seq)
    while engine.scheduler.has_work():
        engine.step()
    assert "Paris" in tok.decode(out)


def test_int8_linears_can_be_turned_off_and_are_refused_where_they_cannot_run(gguf_path: Path) -> None:
    engine = create_text_engine(_smollm2(gguf_path, int8_linears=False))
    assert isinstance(engine, LLMEngine) and not engine.runner.rule.dense_int8
    assert engine.runner.model.lm_head.int8_weight is None
    with pytest.raises(ValueError, match="int8_linears"):
        create_text_engine(_smollm2(gguf_path, dtype="bfloat16", int8_linears=True))


def _int8_state(engine: LLMEngine) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each int8 linear's packed weight, unpacked: (int8 levels, per-row scales)."""
    state = {}
    for name, module in engine.runner.model.named_modules():
        if isinstance(module, Linear) and module.int8_weight is not None:
            pieces = [torch.ops.quantized.linear_unpack(p)[0] for p in module.int8_weight.pieces]
            state[name] = (
                torch.cat([p.int_repr() for p in pieces]),
                torch.cat([p.q_per_channel_scales() for p in pieces]),
            )
    return state


def test_the_gguf_cache_stores_the_int8_forms_and_a_restart_reads_only_them(
    gguf_path: Path, tmp_path: Path
) -> None:
    """The dequantized cache keeps each linear's int8 form; an engine loaded from it reads those
    instead of the fp32 weights and gets the very weights the GGUF load rounds itself."""
    from budrt.engine.factory import _load_checkpoint
    from budrt.engine.safetensors_loader import stored_names
    from budrt.server.gguf_cache import dequantized_source

    cfg = _smollm2(gguf_path)
    cached = dequantized_source(cfg, gguf_path, tmp_path)
    assert cached.format == "safetensors"
    names = stored_names(cached.source)
    q_proj = "layers.0.attn.qkv_proj.weight"  # stored fused, as the model reads it
    assert {q_proj, q_proj + int8.SUFFIXES[0], "embed_tokens.weight" + int8.SUFFIXES[0]} <= names
    assert "layers.0.attn.q_proj.weight" not in names

    checkpoint, dense_int8 = _load_checkpoint(cached, Path(cached.source), torch.float32, True)
    assert dense_int8 and q_proj in checkpoint.rounded and q_proj not in checkpoint.weights
    assert "embed_tokens.weight" not in checkpoint.weights  # its Q8_0 copy is the table
    checkpoint, dense_int8 = _load_checkpoint(
        cached.model_copy(update={"int8_linears": False}), Path(cached.source), torch.float32, True
    )
    assert not dense_int8 and not checkpoint.rounded and q_proj in checkpoint.weights

    from_cache, from_gguf = _int8_state(create_text_engine(cached)), _int8_state(create_text_engine(cfg))
    assert from_cache.keys() == from_gguf.keys() and "lm_head" in from_cache
    for name, (levels, scales) in from_gguf.items():
        assert torch.equal(from_cache[name][0], levels), name
        assert torch.equal(from_cache[name][1], scales), name


def test_activation_levels_follow_the_cpu() -> None:
    """8-bit rows only where FBGEMM's products cannot saturate (AVX512-VNNI), 7-bit elsewhere."""
    avx2 = cpu_features.CPUFeatures.from_flags("epyc", {"avx2", "fma", "f16c"})
    vnni = cpu_features.CPUFeatures.from_flags(
        "xeon", {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni"}
    )
    assert int8.activation_levels(avx2) == 63 and int8.activation_levels(vnni) == 127
    weight = int8.pack([int8.round_weight(torch.randn(64, 128))])[0]
    assert weight.levels == int8.activation_levels()


def test_a_weight_packed_in_pieces_gives_the_bits_of_one_packed_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Weights of more than PIECE_ROWS output rows are packed in pieces (FBGEMM packs a large one
    slowly): the products are the same bits, at any row count."""
    torch.manual_seed(5)
    rounded = int8.round_weight(torch.randn(200, 576) * 0.05)
    [whole] = int8.pack([rounded])
    monkeypatch.setattr(int8, "PIECE_ROWS", 64)
    pieced, small = int8.pack([rounded, int8.round_weight(torch.randn(64, 576))], threads=2)
    assert len(whole.pieces) == 1 and len(pieced.pieces) == 4 and len(small.pieces) == 1
    assert (pieced.out_features, pieced.in_features) == (200, 576)
    for rows in (1, 7, 64):
        x = activations(rows, 576, seed=rows)
        assert torch.equal(pieced(x), whole(x))
