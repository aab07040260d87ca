"""The fused calls (RoPE + cache write, + paged attention for decode-only steps), bf16 and fp32
(over a cache of the same dtype, or fp16/bf16 under fp32), against the torch ops they replace."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from budrt.config import ModelConfig
from budrt.engine import kernels
from budrt.engine.factory import create_text_engine
from budrt.engine.interface import SamplingParams
from budrt.engine.kv_cache import KVCache
from budrt.engine.llama import RotaryEmbedding, apply_rope
from budrt.engine.llm_engine import LLMEngine

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")


# (activations, cache)
PAIRS = [
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
]
PAIR_IDS = ["bf16", "fp32", "fp32-fp16-cache", "fp32-bf16-cache"]


@pytest.mark.parametrize(("dtype", "cache_dtype"), PAIRS, ids=PAIR_IDS)
def test_matches_rope_write_and_attention_done_apart(dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    lengths = [1, 17, 40]  # the new token included
    rotary = RotaryEmbedding(DIM, 10000.0, 512)
    positions = torch.tensor([n - 1 for n in lengths])
    cos, sin = rotary(positions, dtype)
    qkv = torch.randn(len(lengths), (HEADS + 2 * KV_HEADS) * DIM).to(dtype)
    tables = torch.tensor([[5, 0, 0], [1, 2, 0], [3, 6, 7]])  # rows' blocks, padded with 0
    slots = torch.tensor(
        [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for i, p in enumerate(positions.tolist())]
    )
    lens = torch.tensor(lengths)

    def cache_with_history() -> KVCache:
        cache = KVCache(1, 8, BLOCK, KV_HEADS, DIM, cache_dtype)
        cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(1)))
        return cache

    fused_cache, torch_cache = cache_with_history(), cache_with_history()
    keys, values = fused_cache.layer(0)
    fused = kernels.rope_cache_decode_attention(
        qkv, cos.view(3, -1), sin.view(3, -1), keys, values, slots, tables, lens, HEADS, DIM**-0.5
    )

    n = len(lengths)
    qk = apply_rope(qkv[:, : (HEADS + KV_HEADS) * DIM].view(n, -1, DIM), cos, sin)
    q, k = qk[:, :HEADS], qk[:, HEADS:]
    v = qkv[:, (HEADS + KV_HEADS) * DIM :].view(n, KV_HEADS, DIM)
    torch_cache.write(0, slots, k, v)  # rounded to the cache's dtype as torch rounds
    keys, values = torch_cache.layer(0)
    expected = kernels.paged_decode_attention(q.contiguous(), keys, values, tables, lens, DIM**-0.5)

    assert torch.equal(fused_cache.data, torch_cache.data)  # same RoPE'd keys and values, same slots
    assert fused.dtype == dtype and torch.equal(fused, expected.reshape(n, HEADS * DIM))


@pytest.mark.parametrize(("dtype", "cache_dtype"), PAIRS, ids=PAIR_IDS)
def test_rope_cache_write_matches_rope_and_write_done_apart(
    dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    # A step with prompt chunks: rows at any positions, their slots in any blocks.
    torch.manual_seed(2)
    positions = torch.tensor([7, 0, 1, 2, 3, 4, 33])
    n = len(positions)
    cos, sin = RotaryEmbedding(DIM, 10000.0, 512)(positions, dtype)
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * DIM).to(dtype)
    slots = torch.tensor(
        [5 * BLOCK + 7, 2 * BLOCK, 2 * BLOCK + 1, 2 * BLOCK + 2, 2 * BLOCK + 3, 2 * BLOCK + 4, 17]
    )
    fused_cache = KVCache(1, 8, BLOCK, KV_HEADS, DIM, cache_dtype)
    torch_cache = KVCache(1, 8, BLOCK, KV_HEADS, DIM, cache_dtype)
    keys, values = fused_cache.layer(0)
    q, k = kernels.rope_cache_write(qkv, cos.view(n, -1), sin.view(n, -1), keys, values, slots, HEADS)

    qk = apply_rope(qkv[:, : (HEADS + KV_HEADS) * DIM].view(n, -1, DIM), cos, sin)
    v = qkv[:, (HEADS + KV_HEADS) * DIM :].view(n, KV_HEADS, DIM)
    torch_cache.write(0, slots, qk[:, HEADS:], v)
    assert torch.equal(q, qk[:, :HEADS])
    assert torch.equal(k, qk[:, HEADS:])  # the keys before their rounding to the cache's dtype
    assert torch.equal(fused_cache.data, torch_cache.data)
    assert not torch.equal(fused_cache.data, torch.zeros_like(fused_cache.data))


def test_refuses_a_cache_it_cannot_convert_to() -> None:
    cache = KVCache(1, 2, BLOCK, KV_HEADS, DIM, torch.float32)  # fp32 cache under bf16 activations
    keys, values = cache.layer(0)
    qkv = torch.zeros(1, (HEADS + 2 * KV_HEADS) * DIM, dtype=torch.bfloat16)
    cos = torch.ones(1, DIM, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="cache"):
        kernels.rope_cache_write(qkv, cos, cos, keys, values, torch.tensor([0]), HEADS)
    assert not kernels.use_fused_rope(qkv, cache.data)


def test_refuses_a_slot_outside_the_cache() -> None:
    cache = KVCache(1, 2, BLOCK, KV_HEADS, DIM, torch.bfloat16)
    keys, values = cache.layer(0)
    qkv = torch.zeros(1, (HEADS + 2 * KV_HEADS) * DIM, dtype=torch.bfloat16)
    cos = torch.ones(1, DIM, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.rope_cache_decode_attention(
            qkv,
            cos,
            cos,
            keys,
            values,
            torch.tensor([2 * BLOCK]),
            torch.tensor([[0]]),
            torch.tensor([1]),
            HEADS,
            1.0,
        )
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.rope_cache_write(qkv, cos, cos, keys, values, torch.tensor([-1]), HEADS)


def test_bf16_engine_gives_the_same_tokens_with_and_without_the_fused_call(
    smollm2_bf16: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    # No prefix cache: the second pass would prefill only the prompts' uncached tails, and a bf16
    # prefill of other rows rounds differently (oneDNN is not batch-invariant).
    cfg = smollm2_bf16(enable_prefix_caching=False)
    engine = create_text_engine(cfg)
    assert isinstance(engine, LLMEngine)
    # The Python layers: small 4-bit steps would otherwise run the whole stack in C++
    # (decode_stack.py, tested on its own), which calls the fused function from there.
    engine.runner.stack = None
    prompts = ["What is the capital of France?", "Count from one to ten.", "Name three colours."]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def generate() -> list[list[int]]:
        async def one(i: int, prompt: str) -> list[int]:
            chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            tokens: list[int] = []
            async for out in engine.generate(
                f"fused-{i}-{len(calls)}", engine.tokenizer.encode(chat), params
            ):
                tokens.extend(out.token_ids)
            return tokens

        async def run() -> list[list[int]]:
            # One at a time: a step's mix of rows depends on arrival timing, and the mix decides
            # which weights a step uses (see step_path.py), so only lone requests repeat exactly.
            await engine.start()
            try:
                return [await one(i, p) for i, p in enumerate(prompts)]
            finally:
                await engine.stop()

        return asyncio.run(run())

    calls: list[str] = []
    for name in ("rope_cache_decode_attention", "rope_cache_write"):
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a)
        )
    fused = generate()
    assert {"rope_cache_decode_attention", "rope_cache_write"} <= set(calls), "a fused call was not used"
    monkeypatch.setattr(kernels, "use_fused_rope", lambda qkv, cache: False)
    assert generate() == fused
