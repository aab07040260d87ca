"""The GGUF's own 4-bit (and Q8_0 lm_head) weights: read exactly, kept through the gguf cache,
used for small steps."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from gguf_blocks import random_q4

from budrt.config import ModelConfig
from budrt.engine import kernels, quant
from budrt.engine.factory import create_text_engine
from budrt.engine.gguf_loader import load_gguf
from budrt.engine.interface import SamplingParams
from budrt.engine.linear import Linear
from budrt.engine.llm_engine import LLMEngine
from budrt.server.gguf_cache import ENTRY_FILE, dequantized_source


@pytest.mark.parametrize("kind", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_q4_blocks_decode_to_the_files_values(kind: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((48, 256)).astype(np.float32)
    raw = quantize(weights, kind)
    q4 = quant.from_gguf(raw, kind, (48, 256))
    assert q4 is not None
    assert q4.values.dtype == torch.uint8 and int(q4.values.max()) <= 15
    expected = torch.from_numpy(dequantize(raw, kind).astype(np.float32))
    assert torch.equal(q4.dequantize(), expected)


def test_other_types_are_not_q4() -> None:
    raw = quantize(np.ones((2, 32), dtype=np.float32), GGMLQuantizationType.Q8_0)
    assert quant.from_gguf(raw, GGMLQuantizationType.Q8_0, (2, 32)) is None


def test_q8_blocks_decode_to_the_files_values() -> None:
    rng = np.random.default_rng(2)
    raw = quantize(rng.standard_normal((40, 96)).astype(np.float32), GGMLQuantizationType.Q8_0)
    q8 = quant.q8_from_gguf(raw, GGMLQuantizationType.Q8_0, (40, 96))
    assert q8 is not None and q8.values.dtype == torch.int8 and q8.scales.shape == (40, 3)
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0).astype(np.float32))
    assert torch.equal(q8.dequantize(), expected)
    assert quant.q8_from_gguf(raw, GGMLQuantizationType.Q4_1, (40, 96)) is None


def test_smollm2_quantized_weights_equal_the_dequantized_ones(gguf_path: Path) -> None:
    model = load_gguf(gguf_path)
    # Every linear of every layer (q/k rows unpermuted alike): 7 per layer, all Q4_1 in this file;
    # and the token embedding (the tied lm_head), Q8_0.
    assert len(model.quantized) == 7 * model.args.num_layers + 1
    assert isinstance(model.quantized["embed_tokens.weight"], quant.Q8Weight)
    for name, copy in model.quantized.items():
        assert torch.equal(copy.dequantize(), model.weights[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_linear_computes_the_files_weights_times_x(dtype: torch.dtype) -> None:
    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here")
    rng = np.random.default_rng(4)
    raw = quantize(rng.standard_normal((300, 192)).astype(np.float32), GGMLQuantizationType.Q8_0)
    q8 = quant.q8_from_gguf(raw, GGMLQuantizationType.Q8_0, (300, 192))
    assert q8 is not None
    torch.manual_seed(4)
    for rows in (1, 3, 8, 11):  # one pass, and passes of 8 rows plus the rest
        x = torch.randn(rows, 192).to(dtype)
        exact = x.double() @ q8.dequantize().double().t()
        out = kernels.q8_linear(x, q8.values, q8.scales)
        assert out is not None and out.dtype == dtype and out.shape == (rows, 300)
        error = ((out.double() - exact).norm() / exact.norm()).item()
        # The file's weights exactly, sums in fp32; bf16 output rounded once (relative step 2**-8).
        assert error < (1e-6 if dtype == torch.float32 else 2**-8), (rows, error)


def _generate(engine: LLMEngine, requests: list[tuple[str, SamplingParams]]) -> list[list[int]]:
    """Token ids of each (prompt, params), all submitted at once."""

    async def one(index: int, prompt: str, params: SamplingParams) -> list[int]:
        ids = engine.tokenizer.encode(
            engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        )
        tokens: list[int] = []
        async for out in engine.generate(f"q4-test-{index}", ids, params):
            tokens.extend(out.token_ids)
        return tokens

    async def run() -> list[list[int]]:
        await engine.start()
        try:
            return list(await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests))))
        finally:
            await engine.stop()

    return asyncio.run(run())


def test_the_gguf_cache_stores_the_small_copies_as_the_kernels_read_them(
    gguf_path: Path, tmp_path: Path
) -> None:
    """q/k/v and gate/up fused, 4-bit copies tiled: a restart concatenates and packs nothing, and
    reads the very tiles and Q8_0 blocks a load of the GGUF makes, their scales kept in fp32 by a
    bf16 engine (not rounded to the serving dtype)."""
    from budrt.engine.factory import _load_checkpoint
    from budrt.engine.llama import fuse_weights
    from budrt.engine.safetensors_loader import stored_names
    from budrt.engine.tokenizer import MAX_TOKEN_CHARS_KEY, TextTokenizer

    cfg = ModelConfig(name="smollm2", task="chat", format="gguf", source=str(gguf_path), dtype="bfloat16")
    cached = dequantized_source(cfg, gguf_path, tmp_path)
    entry = json.loads((Path(cached.source) / ENTRY_FILE).read_text())
    assert entry == {"source": str(gguf_path.resolve()), "dtype": "bfloat16"}  # what remove_stale reads
    names = stored_names(cached.source)
    assert {"layers.0.attn.qkv_proj.weight.q4_tiles", "layers.0.mlp.gate_up_proj.weight"} <= names
    assert not {"layers.0.attn.q_proj.weight", "layers.0.attn.q_proj.weight.q4_values"} & names
    checkpoint, _ = _load_checkpoint(cached, Path(cached.source), torch.bfloat16, True)
    assert checkpoint.weights["layers.0.attn.qkv_proj.weight"].dtype == torch.bfloat16

    gguf = load_gguf(gguf_path)
    # The longest token, stored with the tokenizer: a restart does not read the vocabulary for it.
    expected_chars = TextTokenizer.from_gguf_metadata(gguf.metadata).max_token_chars
    assert checkpoint.tokenizer.max_token_chars == expected_chars
    stored_config = json.loads((Path(cached.source) / "tokenizer_config.json").read_text())
    assert stored_config[MAX_TOKEN_CHARS_KEY] == expected_chars
    weights, small = dict(gguf.weights), dict(gguf.quantized)
    fuse_weights(weights, small, {})
    assert checkpoint.quantized.keys() == small.keys()
    for name, copy in small.items():
        stored = checkpoint.quantized[name]
        if isinstance(copy, quant.Q4Weight):
            assert isinstance(stored, quant.Q4Tiles), name
            assert all(torch.equal(a, b) for a, b in zip(stored, quant.pack_tiles(copy), strict=True)), name
        else:
            assert isinstance(stored, quant.Q8Weight) and isinstance(copy, quant.Q8Weight), name
            assert stored.scales.dtype == torch.float32 and torch.equal(stored.scales, copy.scales), name
            assert torch.equal(stored.values, copy.values), name


def test_a_load_from_the_gguf_cache_leaves_no_view_of_its_file(
    gguf_path: Path, tmp_path: Path, smollm2_fast: Callable[..., ModelConfig]
) -> None:
    """Weights the build copies into memory of its own are read as views of the mapped file
    (factory._borrowed: with oneDNN the linears' bf16 weights, in fp32 with FBGEMM the int8
    levels); on every path, once loaded, nothing holds the file mapped (a kept view would keep
    every page the load read resident)."""
    cached = dequantized_source(smollm2_fast(), gguf_path, tmp_path)
    model_file = str(Path(cached.source) / "model.safetensors")
    engine = create_text_engine(cached)
    assert isinstance(engine, LLMEngine)
    assert model_file not in Path("/proc/self/maps").read_text()
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    [tokens] = _generate(engine, [("What is the capital of France?", greedy)])
    assert "Paris" in engine.tokenizer.decode(tokens)


def test_gguf_cache_keeps_q4_and_the_engine_answers_with_it(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smollm2_fast: Callable[..., ModelConfig]
) -> None:
    cfg = smollm2_fast(max_num_seqs=2)
    cached = dequantized_source(cfg, gguf_path, tmp_path)
    assert cached.format == "safetensors"
    engine = create_text_engine(cached)
    assert isinstance(engine, LLMEngine)
    model = engine.runner.model
    linears = [m for m in model.layers.modules() if isinstance(m, Linear)]
    # 2 fused + 2 plain linears per layer carry the 4-bit weights; lm_head its Q8_0 ones.
    assert sum(m.q4_tiles is not None for m in linears) == 4 * model.args.num_layers
    assert model.lm_head.q8 is not None and engine.runner.rule.small_logits_rows > 0
    calls: list[int] = []
    real_q8, real_q4 = kernels.q8_linear, kernels.q4_tiles_linear
    monkeypatch.setattr(kernels, "q8_linear", lambda *a: calls.append(1) or real_q8(*a))
    monkeypatch.setattr(kernels, "q4_tiles_linear", lambda *a: calls.append(1) or real_q4(*a))
    # Small decode steps may instead run all layers in one C++ call on the same weights.
    real_stack = kernels.decode_layers
    monkeypatch.setattr(
        kernels,
        "decode_layers",
        lambda weights, *a: (weights == "q4" and calls.append(1)) or real_stack(weights, *a),
    )
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    [tokens] = _generate(engine, [("What is the capital of France?", greedy)])
    assert "Paris" in engine.tokenizer.decode(tokens)
    assert calls, "a lone greedy decode did not use the 4-bit weights"

    # A seeded request never does, so its output is the same whatever shares its steps: alone,
    # again (its prompt now a prefix-cache hit), and among other requests.
    story = "Tell me a short story."
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    calls.clear()
    [alone] = _generate(engine, [(story, seeded)])
    assert not calls
    [again] = _generate(engine, [(story, seeded)])
    others = [(f"Count to {n}.", SamplingParams(max_tokens=8 + n, temperature=0.0)) for n in range(3)]
    mixed = _generate(engine, [*others, (story, seeded)])[-1]
    assert alone == again == mixed


@pytest.fixture
def tiles() -> None:
    if not (kernels.prepare() and kernels.q4_tiles_available()):
        pytest.skip("this build has no tile kernel (needs AVX2+FMA+F16C or AVX512-VNNI)")


@pytest.mark.usefixtures("tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_tiles_compute_the_files_weights_times_x(dtype: torch.dtype) -> None:
    # Activations go through two int8 roundings per 32-block (q4_linear.cpp): the result must be as
    # close to the exact product as fp32 arithmetic allows, not just int8-close (~5e-3).
    torch.manual_seed(0)
    for out, inp in ((32, 64), (48, 96), (160, 576)):
        q4 = random_q4(out, inp, seed=out)
        packed, dm = quant.pack_tiles(q4)
        assert packed.dim() == 1 and dm.shape == (out // 16, inp // 32, 2, 16)  # the tile layout
        for rows in (1, 2, 3, 4, 5, 7, 9, 13):  # whole and partial groups of rows at once
            x = torch.randn(rows, inp).to(dtype)
            x[0, :7] *= 40  # an outlier block
            exact = x.double() @ q4.dequantize().double().t()
            got = kernels.q4_tiles_linear(x, packed, dm)
            assert got.dtype == dtype and got.shape == (rows, out)
            error = ((got.double() - exact).norm() / exact.norm()).item()
            assert error < (2e-4 if dtype == torch.float32 else 4e-3), (out, inp, rows, error)
    none = torch.empty(0, 64, dtype=dtype)
    assert kernels.q4_tiles_linear(none, *quant.pack_tiles(random_q4(32, 64, 1))).shape == (0, 32)


@pytest.mark.usefixtures("tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_tiles_with_one_rounding_are_int8_close(dtype: torch.dtype) -> None:
    # One int8 rounding per 32-block of x: half the integer work, int8 activations' error.
    torch.manual_seed(1)
    q4 = random_q4(64, 576, seed=5)
    packed, dm = quant.pack_tiles(q4)
    for rows in (1, 5, 8):
        x = torch.randn(rows, 576).to(dtype)
        exact = x.double() @ q4.dequantize().double().t()
        one = kernels.q4_tiles_linear(x, packed, dm, rounds=1)
        two = kernels.q4_tiles_linear(x, packed, dm, rounds=2)
        assert one.dtype == dtype and one.shape == (rows, 64)
        one_error = ((one.double() - exact).norm() / exact.norm()).item()
        two_error = ((two.double() - exact).norm() / exact.norm()).item()
        assert two_error < one_error < 2e-2, (rows, one_error, two_error)


@pytest.mark.usefixtures("tiles")
def test_q4_tiles_refuse_bad_shapes() -> None:
    packed, dm = quant.pack_tiles(random_q4(32, 64, seed=4))
    with pytest.raises(RuntimeError, match="K must be"):
        kernels.q4_tiles_linear(torch.randn(1, 96, dtype=torch.bfloat16), packed, dm)
    with pytest.raises(RuntimeError, match="packed must be"):
        kernels.q4_tiles_linear(torch.randn(1, 64, dtype=torch.bfloat16), packed[:-1].contiguous(), dm)
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        kernels.q4_tiles_linear(torch.randn(1, 64, dtype=torch.float64), packed, dm)
    with pytest.raises(RuntimeError, match="rounds must be"):
        kernels.q4_tiles_linear(torch.randn(1, 64), packed, dm, rounds=3)


def test_a_conversion_removes_the_stale_entries_of_its_gguf(tmp_path: Path) -> None:
    """Entries an earlier VERSION wrote (no entry file) or made from an earlier state of the same
    file go; an entry of another dtype now, another file's entries and foreign folders stay."""
    from budrt.server import gguf_cache

    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    root = tmp_path / "cache"

    def entry(name: str, marker: dict[str, str] | None) -> Path:
        folder = root / name
        folder.mkdir(parents=True)
        if marker is not None:
            (folder / gguf_cache.ENTRY_FILE).write_text(json.dumps(marker))
        return folder

    source = str(gguf.resolve())
    current = entry(
        f"model.Q4_0-{gguf_cache._key(gguf, 'bfloat16')}", {"source": source, "dtype": "bfloat16"}
    )
    other_dtype = entry(
        f"model.Q4_0-{gguf_cache._key(gguf, 'float32')}", {"source": source, "dtype": "float32"}
    )
    old_version = entry("model.Q4_0-" + "0" * 32, None)
    old_file = entry("model.Q4_0-" + "1" * 32, {"source": source, "dtype": "bfloat16"})
    other_file = entry(
        "model.Q4_0-" + "2" * 32, {"source": "/elsewhere/model.Q4_0.gguf", "dtype": "bfloat16"}
    )
    other_model = entry("model.Q4_0-large-" + "3" * 32, None)
    foreign = entry("model.Q4_0-notes", None)
    gguf_cache.remove_stale(root, gguf)
    assert current.is_dir() and other_dtype.is_dir() and other_file.is_dir()
    assert other_model.is_dir() and foreign.is_dir()
    assert not old_version.exists() and not old_file.exists()
