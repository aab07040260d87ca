"""decode_stack.py: all layers of a small 4-bit decode step in one C++ call, exactly equal to the
Python layers it replaces."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from budrt.config import ModelConfig
from budrt.engine import kernels
from budrt.engine.factory import create_text_engine
from budrt.engine.interface import SamplingParams
from budrt.engine.llm_engine import LLMEngine
from budrt.engine.packed_linear import can_pack
from budrt.engine.sequence import make_sequence


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not can_pack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("bf16 packed linears need AVX512-BF16/AMX")
    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")


def make_engine(config: Callable[..., ModelConfig], max_num_seqs: int = 4) -> LLMEngine:
    engine = create_text_engine(config(max_num_seqs=max_num_seqs, enable_prefix_caching=False))
    assert isinstance(engine, LLMEngine)
    return engine


def decode(
    engine: LLMEngine, prompts: list[list[int]], steps: int, params: SamplingParams
) -> list[list[int]]:
    """Greedy tokens of `prompts`, prefilled together and then decoded together step by step (a
    fixed mix of rows, whatever the timing)."""
    out: list[list[int]] = [[] for _ in prompts]
    for i, ids in enumerate(prompts):
        sink = lambda output, i=i: out[i].extend(output.token_ids)  # noqa: E731
        seq = make_sequence(f"s{i}", ids, params, engine.tokenizer, 256, engine.vocab_size, sink)
        engine.scheduler.add(seq)
    engine.scheduler.max_num_batched_tokens = 4096
    for _ in range(steps):
        engine.step()
    while engine.scheduler.has_work():  # let them finish so the engine is clean for the next run
        engine.step()
    return out


def test_small_decode_steps_give_the_same_tokens_with_the_stack(
    smollm2_bf16: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(smollm2_bf16)
    model = engine.runner.model
    assert model.decode_stack is not None, "SmolLM2's GGUF should fit the one-call kernel"
    chats = ["What is the capital of France?", "Count from one to ten.", "Name three colours."]
    prompts = [
        engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": c}]))
        for c in chats
    ]
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    calls: list[int] = []
    real = kernels.q4_decode_layers
    monkeypatch.setattr(kernels, "q4_decode_layers", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for batch in (prompts[:1], prompts):  # one row, and three rows in every decode step
        calls.clear()
        with_stack = decode(engine, batch, 20, greedy)
        assert calls and set(calls) == {len(batch)}, "the small decode steps did not use the stack"
        stack = model.decode_stack
        model.decode_stack = None
        try:
            without = decode(engine, batch, 20, greedy)
        finally:
            model.decode_stack = stack
        assert with_stack == without
        assert all(len(tokens) == 20 for tokens in with_stack)
    assert "Paris" in engine.tokenizer.decode(decode(engine, prompts[:1], 20, greedy)[0])


def test_steps_the_stack_does_not_take(
    smollm2_bf16: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(smollm2_bf16, max_num_seqs=32)  # room for q4_decode_rows + 1 rows
    calls: list[int] = []
    real = kernels.q4_decode_layers
    monkeypatch.setattr(kernels, "q4_decode_layers", lambda *a: calls.append(1) or real(*a))
    prompt = list(range(100, 120))  # short: q4_decode_rows + 1 of them prefill in one step
    # A seeded request's steps stay on bf16 (SmallWeights), so never on the 4-bit stack.
    decode(engine, [prompt], 6, SamplingParams(max_tokens=6, temperature=1.0, seed=7))
    assert not calls
    # More rows than q4_decode_rows (that finish together): bf16 steps.
    stack = engine.runner.model.decode_stack
    assert stack is not None
    rows = stack.rows + 1
    decode(engine, [prompt] * rows, 6, SamplingParams(max_tokens=6, temperature=0.0))
    assert not calls
