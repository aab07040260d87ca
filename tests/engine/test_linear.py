"""engine/linear.py: a linear's dense weights (fp32, or bf16 packed for oneDNN) and the GGUF's small
copies compute the same product as `F.linear` on the file's values; a step reads the form it is told."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from gguf_blocks import random_q4, random_q8

from budrt.engine import kernels, quant
from budrt.engine.cpu_features import native_bf16
from budrt.engine.linear import Linear, LinearForms, onednn_packs, onednn_rows

ONEDNN = onednn_packs(torch.bfloat16, torch.device("cpu"), native_bf16()[0])
# Every dense form this machine can run: fp32 always, bf16 packed for oneDNN where bf16 is native.
DENSE_FORMS = [pytest.param(torch.float32, False, id="fp32")] + [
    pytest.param(
        torch.bfloat16, True, id="bf16-onednn", marks=pytest.mark.skipif(not ONEDNN, reason="no native bf16")
    )
]


@pytest.fixture(scope="module")
def cpu_kernels() -> None:
    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact.double()).norm() / exact.double().norm()).item()


@pytest.mark.parametrize(("dtype", "onednn"), DENSE_FORMS)
@pytest.mark.parametrize("bias", [False, True])
def test_dense_form_matches_f_linear(dtype: torch.dtype, onednn: bool, bias: bool) -> None:
    torch.manual_seed(0)
    weight, b = torch.randn(160, 96, dtype=dtype), torch.randn(160, dtype=dtype) if bias else None
    linear = Linear(weight, b, LinearForms(onednn=onednn))
    with torch.inference_mode():
        for rows in (1, 3, 40):
            x = torch.randn(rows, 96, dtype=dtype)
            ref = F.linear(x, weight, b)
            out = linear(x)
            assert out.shape == (rows, 160) and out.dtype == dtype
            if onednn:  # oneDNN's blocked layout sums in another order
                assert relative_error(out, ref) < 0.01
            else:
                assert torch.equal(out, ref)
            assert linear(x.view(rows, 1, 96)).shape == (rows, 1, 160)  # leading dims kept


@pytest.mark.parametrize(("dtype", "onednn"), DENSE_FORMS)
def test_split_rows_give_each_part_as_computed_alone(dtype: torch.dtype, onednn: bool) -> None:
    """A seeded step's dense matmuls run `split_rows` rows per call (step_path.EXACT_ROWS)."""
    torch.manual_seed(1)
    linear = Linear(torch.randn(64, 32, dtype=dtype), None, LinearForms(onednn=onednn))
    x = torch.randn(70, 32, dtype=dtype)
    with torch.inference_mode():
        split = linear(x, split_rows=32)
        alone = torch.cat([linear(x[i : i + 32]) for i in range(0, 70, 32)])
    assert torch.equal(split, alone)


def test_packed_linears_run_at_few_row_counts() -> None:
    """oneDNN builds and caches a primitive per row count (~0.7 MB each): the packed linears pad
    their rows to a few counts, never past 32 from at most 32 (step_path.EXACT_ROWS), and never
    more than half again the rows."""
    padded = {rows: onednn_rows(rows) for rows in range(1, 4097)}
    assert all(p >= rows for rows, p in padded.items())
    assert all(p <= 32 for rows, p in padded.items() if rows <= 32)
    assert all(p <= 1.5 * rows for rows, p in padded.items() if rows > 8)
    assert sorted({p for rows, p in padded.items() if rows <= 512}) == [
        8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512
    ]  # fmt: skip
    assert all(padded[p] == p for p in padded.values() if p <= 4096)  # a padded count stays


@pytest.mark.usefixtures("cpu_kernels")
def test_the_decode_stack_pads_rows_as_the_linears_do() -> None:
    """csrc/decode_stack.cpp runs the packed linears itself: the same rule, in C++."""
    module = kernels._module
    assert module is not None
    assert [module.onednn_rows(rows) for rows in range(1, 4097)] == [onednn_rows(r) for r in range(1, 4097)]


@pytest.mark.skipif(not ONEDNN, reason="oneDNN packs bf16 only on a CPU with bf16 dot products")
def test_a_packed_linear_gives_each_row_count_its_own_rows() -> None:
    """Padded calls return exactly the rows asked for, each as a call of that row alone computes
    it (at most EXACT_ROWS rows: oneDNN's bits do not depend on the row count there)."""
    torch.manual_seed(2)
    linear = Linear(
        torch.randn(96, 64, dtype=torch.bfloat16),
        torch.randn(96, dtype=torch.bfloat16),
        LinearForms(onednn=True),
    )
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        alone = torch.cat([linear(x[i : i + 1]) for i in range(32)])
        for rows in (1, 5, 9, 13, 17, 25, 32):
            out = linear(x[:rows])
            assert out.shape == (rows, 96) and out.is_contiguous()
            assert torch.equal(out, alone[:rows])


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize(("dtype", "onednn"), DENSE_FORMS)
@pytest.mark.parametrize("bias", [False, True])
def test_small_steps_read_the_4bit_copy(dtype: torch.dtype, onednn: bool, bias: bool) -> None:
    torch.manual_seed(0)
    q4 = random_q4(96, 128, seed=1)
    b = torch.randn(96, dtype=dtype) if bias else None
    linear = Linear(q4.dequantize().to(dtype), b, LinearForms(onednn=onednn, small=True), q4)
    assert linear.has_small
    with torch.inference_mode():
        for rows in (1, 2, 5):
            x = torch.randn(rows, 128, dtype=dtype)
            exact = F.linear(x.double(), q4.dequantize().double(), None if b is None else b.double())
            small, dense = linear(x, small=True), linear(x)
            assert small.dtype == dtype and small.shape == (rows, 96)
            assert relative_error(small, exact) < (1e-3 if dtype == torch.float32 else 0.01)
            assert relative_error(dense, exact) < (1e-5 if dtype == torch.float32 else 0.01)
    # Breaking the 4-bit copy changes what `small` reads only: proof that it ran on it.
    assert linear.q4_tiles is not None
    linear.q4_tiles[1].zero_()
    with torch.inference_mode():
        x = torch.randn(2, 128, dtype=dtype)
        floor = 0.0 if b is None else b.float().abs().max().item() + 1e-3
        assert linear(x, small=True).float().abs().max().item() <= floor
        assert linear(x).float().abs().max().item() > 0.1


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize(("dtype", "onednn"), DENSE_FORMS)
def test_small_logits_read_the_q8_copy(dtype: torch.dtype, onednn: bool) -> None:
    q8 = random_q8(300, 128, seed=3)
    linear = Linear(q8.dequantize().to(dtype), None, LinearForms(onednn=onednn, small=True), q8)
    with torch.inference_mode():
        for rows in (1, 3, 9):
            x = torch.randn(rows, 128, dtype=dtype)
            exact = F.linear(x.double(), q8.dequantize().double())
            out = linear(x, small=True)
            assert out.dtype == dtype and out.shape == (rows, 300)
            # The file's values in fp32, rounded to the activations' dtype once at the end.
            assert relative_error(out, exact) < (1e-5 if dtype == torch.float32 else 2**-8)
    q8.scales.zero_()
    with torch.inference_mode():
        x = torch.randn(2, 128, dtype=dtype)
        assert linear(x, small=True).abs().max() == 0 and linear(x).float().abs().max() > 0.1


def test_rows_not_in_whole_tiles_keep_only_the_dense_form() -> None:
    q4 = random_q4(40, 64, seed=2)  # not whole tiles of 16 output rows
    linear = Linear(q4.dequantize(), None, LinearForms(small=True), q4)
    assert not linear.has_small
    x = torch.randn(2, 64)
    with torch.inference_mode():
        assert torch.equal(linear(x, small=True), F.linear(x, q4.dequantize()))


def test_forms_without_small_copies_keep_none() -> None:
    q4 = random_q4(32, 64, seed=5)
    assert not Linear(q4.dequantize(), None, LinearForms(small=False), q4).has_small


def test_a_tied_lm_head_shares_the_embedding_and_takes_its_q8(tmp_path: Path) -> None:
    """The model's linears are made whole at build (factory.build_model): q/k/v and gate/up fused
    from the checkpoint's names, and a tied lm_head reads the embedding's own tensor and, on the
    small path, the embedding's Q8_0 copy."""
    from budrt.engine.factory import _Checkpoint, build_model
    from budrt.engine.safetensors_loader import load_safetensors
    from budrt.engine.tokenizer import TextTokenizer
    from tests.tiny_models import build_tiny_llama

    directory = build_tiny_llama(tmp_path / "tiny")
    args, weights = load_safetensors(directory)
    args = dataclasses.replace(args, tie_word_embeddings=True)  # as SmolLM2's
    weights.pop("lm_head.weight", None)
    embedding = weights["embed_tokens.weight"]
    raw = quantize(embedding.numpy(), GGMLQuantizationType.Q8_0)
    q8 = quant.q8_from_gguf(raw, GGMLQuantizationType.Q8_0, tuple(embedding.shape))
    checkpoint = _Checkpoint(
        args, weights, {"embed_tokens.weight": q8}, {}, TextTokenizer.from_directory(directory)
    )
    for small in (False, True):
        model = build_model(checkpoint, torch.float32, 64, LinearForms(small=small))
        assert model.lm_head.weight is model.embed_tokens.weight
        assert (model.lm_head.q8 is q8) == small
        qkv = model.layers[0].attn.qkv_proj
        q, k, v = (weights[f"layers.0.attn.{n}_proj.weight"] for n in "qkv")
        assert torch.equal(qkv.weight, torch.cat([q, k, v]))
    assert "layers.0.attn.q_proj.weight" in checkpoint.weights  # the loaded checkpoint is left whole


@pytest.mark.skipif(not ONEDNN, reason="oneDNN packs bf16 only on a CPU with bf16 dot products")
def test_with_packed_weights_a_tied_model_embeds_from_its_q8_blocks(tmp_path: Path) -> None:
    """The dense table is read once, to pack the tied lm_head; the embedding then reads the Q8_0
    blocks, which the lm_head's small copy shares: the same bf16 rows in half the bytes."""
    from budrt.engine.factory import _Checkpoint, build_model
    from budrt.engine.llama import Q8Embedding
    from budrt.engine.safetensors_loader import load_safetensors
    from budrt.engine.tokenizer import TextTokenizer
    from tests.tiny_models import build_tiny_llama

    directory = build_tiny_llama(tmp_path / "tiny")
    args, weights = load_safetensors(directory)
    args = dataclasses.replace(args, tie_word_embeddings=True)
    weights.pop("lm_head.weight", None)
    embedding = weights["embed_tokens.weight"]
    raw = quantize(embedding.numpy(), GGMLQuantizationType.Q8_0)
    q8 = quant.q8_from_gguf(raw, GGMLQuantizationType.Q8_0, tuple(embedding.shape))
    assert q8 is not None
    weights["embed_tokens.weight"] = q8.dequantize()  # the table a GGUF load makes of those blocks
    tokenizer = TextTokenizer.from_directory(directory)
    checkpoint = _Checkpoint(args, weights, {"embed_tokens.weight": q8}, {}, tokenizer)
    model = build_model(checkpoint, torch.bfloat16, 64, LinearForms(onednn=True, small=True))
    assert isinstance(model.embed_tokens, Q8Embedding) and model.embed_tokens.q8 is model.lm_head.q8
    ids = torch.arange(args.vocab_size)
    assert torch.equal(model.embed_tokens(ids), q8.dequantize().to(torch.bfloat16))
