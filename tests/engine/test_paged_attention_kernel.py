"""The C++ paged decode-attention kernel against the torch path it replaces (gather + SDPA)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from budrt.engine import kernels
from budrt.engine.attention import AttentionContext, paged_attention
from budrt.engine.kv_cache import KVCache

BLOCK = 16
LENGTHS = [1, 15, 16, 17, 300]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def built() -> None:
    """Skips a test where the CPU kernels are switched off or could not be built here."""
    if not kernels.enabled():
        pytest.skip(f"{kernels.ENV_SWITCH}=torch forces the torch path")
    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")


def make_case(
    lengths: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int
) -> tuple[KVCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random cache whose sequences own shuffled, non-consecutive blocks; the unused table tail
    points at block 0 like the runner's padding."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [(n + BLOCK - 1) // BLOCK for n in lengths]
    num_blocks = sum(per_seq) + 7
    cache = KVCache(2, num_blocks, BLOCK, kv_heads, dim, dtype)
    cache.data.copy_(torch.randn(cache.data.shape, generator=gen))
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 only as padding
    width = max(per_seq)
    tables = torch.zeros(len(lengths), width, dtype=torch.long)
    used = 0
    for row, count in enumerate(per_seq):
        tables[row, :count] = order[used : used + count]
        used += count
    q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    return cache, q, tables, torch.tensor(lengths, dtype=torch.long)


def reference(
    q: torch.Tensor, cache: KVCache, layer: int, tables: torch.Tensor, lengths: list[int]
) -> torch.Tensor:
    """Gather + masked SDPA in fp32: the torch path, without bf16 rounding of the intermediate."""
    context = max(lengths)
    keys, values = cache.gather(layer, tables, context)
    mask = torch.arange(context).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    out = F.scaled_dot_product_attention(
        q.float().unsqueeze(2),
        keys.float(),
        values.float(),
        attn_mask=mask[:, None, None, :],
        enable_gqa=True,
    )
    return out.squeeze(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_kernel_matches_gather_sdpa(built, dtype: torch.dtype, ratio: int) -> None:  # type: ignore[no-untyped-def]
    kv_heads = 3 if ratio != 4 else 2
    heads = kv_heads * ratio
    # 48: not a whole number of vector registers (the scalar path); 128: fewer heads share a pass
    for dim in (64, 48, 128):
        cache, q, tables, lengths = make_case(LENGTHS, heads, kv_heads, dim, dtype, seed=ratio * 100 + dim)
        for layer in (0, 1):
            k, v = cache.layer(layer)
            out = kernels.paged_decode_attention(q, k, v, tables, lengths, dim**-0.5)
            assert out.shape == q.shape and out.dtype == dtype
            expected = reference(q, cache, layer, tables, LENGTHS)
            torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_fp32_query_over_a_16bit_cache(built, cache_dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """The default cache under fp32 activations on a CPU: keys and values widened as read, the
    rest in fp32 as over an fp32 cache, so the result is fp32 attention over the rounded cache."""
    for dim in (64, 48):  # the vector path and the scalar one
        cache, q, tables, lengths = make_case(LENGTHS, 9, 3, dim, cache_dtype, seed=dim)
        q = q.float() + 0.001 * torch.randn(q.shape, generator=torch.Generator().manual_seed(dim))
        k, v = cache.layer(1)
        out = kernels.paged_decode_attention(q, k, v, tables, lengths, dim**-0.5)
        assert out.dtype == torch.float32
        widened = KVCache(2, cache.num_blocks, BLOCK, 3, dim, torch.float32)
        widened.data.copy_(cache.data)
        wk, wv = widened.layer(1)
        exact = kernels.paged_decode_attention(q, wk, wv, tables, lengths, dim**-0.5)
        torch.testing.assert_close(out, exact, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out, reference(q, cache, 1, tables, LENGTHS), atol=1e-5, rtol=1e-4)
    other = torch.float16 if cache_dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match="fp32 or of the cache"):
        kernels.paged_decode_attention(q.to(other), k, v, tables, lengths, 0.1)


def test_int32_tables_and_threads(built) -> None:  # type: ignore[no-untyped-def]
    """int32 tables give the same result, and so does a single thread (different work split, so
    each task looks ahead at a different next one; an empty sequence among them)."""
    cache, q, tables, lengths = make_case([*LENGTHS, 0, *LENGTHS * 2], 9, 3, 64, torch.float32, seed=7)
    k, v = cache.layer(0)
    out = kernels.paged_decode_attention(q, k, v, tables, lengths, 0.125)
    out32 = kernels.paged_decode_attention(q, k, v, tables.int(), lengths.int(), 0.125)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = kernels.paged_decode_attention(q, k, v, tables, lengths, 0.125)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out32, out, atol=0, rtol=0)
    torch.testing.assert_close(single, out, atol=0, rtol=0)


def test_non_contiguous_query(built) -> None:  # type: ignore[no-untyped-def]
    """q as the model makes it: a view into a wider projection output."""
    cache, q, tables, lengths = make_case([5, 40], 6, 2, 64, torch.float32, seed=3)
    wide = torch.randn(2, 6, 128)
    wide[..., :64] = q
    view = wide[..., :64]
    assert not view.is_contiguous()
    k, v = cache.layer(1)
    out = kernels.paged_decode_attention(view, k, v, tables, lengths, 0.125)
    torch.testing.assert_close(out, kernels.paged_decode_attention(q, k, v, tables, lengths, 0.125))


def test_bad_tables_are_errors(built) -> None:  # type: ignore[no-untyped-def]
    cache, q, tables, lengths = make_case([17, 3], 3, 3, 64, torch.float32, seed=1)
    k, v = cache.layer(0)
    bad = tables.clone()
    bad[0, 1] = cache.num_blocks  # past the end of the cache
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.paged_decode_attention(q, k, v, bad, lengths, 0.125)
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.paged_decode_attention(q, k, v, tables, torch.tensor([17, 33]), 0.125)


def test_paged_attention_uses_kernel_for_decodes(built, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """attention.py's decode rows give the same output through the kernel and the torch path."""
    lengths = [17, 300, 1]
    cache, q, tables, lens = make_case(lengths, 9, 3, 64, torch.float32, seed=11)
    k_new = torch.randn(3, 3, 64)
    v_new = torch.randn(3, 3, 64)
    slots = torch.tensor(
        [int(tables[i, (n - 1) // BLOCK]) * BLOCK + (n - 1) % BLOCK for i, n in enumerate(lengths)]
    )
    mask = torch.arange(300).unsqueeze(0) < lens.unsqueeze(1)

    def run() -> torch.Tensor:
        ctx = AttentionContext(
            positions=lens - 1,
            slots=slots,
            num_decode=3,
            decode_block_tables=tables,
            decode_context=300,
            decode_lengths=lens,
            decode_mask=mask[:, None, None, :],
        )
        return paged_attention(q, k_new, v_new, ctx, cache, 1)

    calls = []
    real = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    fused = run()
    assert calls, "the kernel was not used"
    monkeypatch.setenv(kernels.ENV_SWITCH, "torch")
    torch_path = run()
    assert len(calls) == 1
    torch.testing.assert_close(fused, torch_path, atol=1e-5, rtol=1e-5)


def test_failed_build_falls_back_to_torch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No usable compiler: one warning, no kernel, and decode attention still answers (torch path)."""
    script = """
import logging, torch
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from budrt.engine import kernels
from budrt.engine.attention import AttentionContext, paged_attention
from budrt.engine.kv_cache import KVCache
assert not kernels.prepare()
assert not kernels.prepare()  # asked again: no second build, no second warning
cache = KVCache(1, 4, 16, 1, 64, torch.float32)
q, k, v = torch.randn(1, 2, 64), torch.randn(1, 1, 64), torch.randn(1, 1, 64)
ctx = AttentionContext(positions=torch.tensor([0]), slots=torch.tensor([16]), num_decode=1,
    decode_block_tables=torch.tensor([[1]]), decode_context=1, decode_lengths=torch.tensor([1]))
out = paged_attention(q, k, v, ctx, cache, 0)
torch.testing.assert_close(out.view(2, 64), v[0].expand(2, 64))  # one position: its value
print("fallback ok")
"""
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(tmp_path),
        "CXX": str(tmp_path / "no-such-compiler"),
    }
    env.pop(kernels.ENV_SWITCH, None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
    assert result.stderr.count("CPU kernels unavailable") == 1, result.stderr
