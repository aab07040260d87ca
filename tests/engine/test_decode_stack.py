"""decode_stack.py: all layers of a decode-only step in one C++ call (4-bit weights for small
steps, the dense ones above), exactly equal to the Python layers it replaces; on every CPU path
this machine runs (fp32; bf16 where native)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from budrt.config import ModelConfig
from budrt.engine import kernels
from budrt.engine.factory import create_text_engine
from budrt.engine.interface import SamplingParams
from budrt.engine.llm_engine import LLMEngine
from budrt.engine.sequence import make_sequence
from budrt.engine.step_path import EXACT_ROWS


def make_engine(config: Callable[..., ModelConfig], max_num_seqs: int = 4, **overrides: object) -> LLMEngine:
    # A cache that holds every sequence at once (fp32 blocks are twice bf16's size).
    cache = max(16, 3 * max_num_seqs) * 1024**2
    cfg = config(max_num_seqs=max_num_seqs, enable_prefix_caching=False, kv_cache_bytes=cache, **overrides)
    engine = create_text_engine(cfg)
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


def record_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(weights, rows) of every one-call stack run from now on: "q4" or "dense"."""
    calls: list[tuple[str, int]] = []
    real = kernels.decode_layers

    def recording(weights: str, x: torch.Tensor, *rest: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((weights, x.shape[0]))
        return real(weights, x, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(kernels, "decode_layers", recording)
    return calls


def with_and_without_stack(
    engine: LLMEngine, batch: list[list[int]], steps: int, params: SamplingParams
) -> tuple[list[list[int]], list[list[int]]]:
    """`decode` of `batch` with the model's one-call stack, then with the Python layers."""
    runner = engine.runner
    with_stack = decode(engine, batch, steps, params)
    rule = runner.rule
    runner.rule = dataclasses.replace(rule, stack=False)
    try:
        without = decode(engine, batch, steps, params)
    finally:
        runner.rule = rule
    return with_stack, without


def test_small_decode_steps_give_the_same_tokens_with_the_stack(
    smollm2_fast: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(smollm2_fast)
    assert engine.runner.stack is not None, "SmolLM2's GGUF should fit the one-call kernel"
    chats = ["What is the capital of France?", "Count from one to ten.", "Name three colours."]
    prompts = [
        engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": c}]))
        for c in chats
    ]
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    recorded = record_calls(monkeypatch)
    for batch in (prompts[:1], prompts):  # one row, and three rows in every decode step
        recorded.clear()
        with_stack, without = with_and_without_stack(engine, batch, 20, greedy)
        calls = [rows for name, rows in recorded if name == "q4"]
        assert calls and set(calls) == {len(batch)}, "the small decode steps did not use the stack"
        assert with_stack == without
        assert all(len(tokens) == 20 for tokens in with_stack)
    assert "Paris" in engine.tokenizer.decode(decode(engine, prompts[:1], 20, greedy)[0])


def test_larger_and_seeded_steps_give_the_same_tokens_on_the_dense_stack(
    smollm2_fast: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(smollm2_fast, max_num_seqs=40, int8_linears=False)
    rule = engine.runner.rule
    assert engine.runner.stack is not None and rule.small_rows > 0
    calls = record_calls(monkeypatch)
    prompts = [list(range(100 + i, 120 + i)) for i in range(rule.small_rows + 1)]
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    cases = [
        # More rows than q4_decode_rows: the Python layers take the dense weights, so does the stack.
        (prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
        # A seeded request's steps stay on the dense weights (step_path.py) at any row count,
        # in pieces of EXACT_ROWS rows above it.
        (prompts[:1], seeded),
        ([list(range(100 + i, 120 + i)) for i in range(EXACT_ROWS + 3)], seeded),
    ]
    for batch, params in cases:
        calls.clear()
        with_stack, without = with_and_without_stack(engine, batch, 8, params)
        assert calls and {name for name, _ in calls} == {"dense"}
        assert {rows for _, rows in calls} == {len(batch)}
        assert with_stack == without
        assert all(len(tokens) == 8 for tokens in with_stack)


def test_with_int8_dense_weights_larger_and_seeded_steps_walk_the_python_layers(
    smollm2_fast: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(smollm2_fast, max_num_seqs=40)
    if not engine.runner.rule.dense_int8:
        pytest.skip("this path's dense weights are not int8 here (bf16, or no FBGEMM)")
    calls = record_calls(monkeypatch)
    prompts = [list(range(100 + i, 120 + i)) for i in range(engine.runner.rule.small_rows + 1)]
    for params in (
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=1.0, seed=7, ignore_eos=True),
    ):
        assert all(len(tokens) == 4 for tokens in decode(engine, prompts, 4, params))
    assert not calls  # csrc/decode_stack.cpp has no int8 linear: these steps are Python layers


def test_steps_with_a_prompt_chunk_keep_the_python_layers(
    smollm2_fast: Callable[..., ModelConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(smollm2_fast)
    calls = record_calls(monkeypatch)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    def add(name: str) -> None:
        seq = make_sequence(
            name, list(range(100, 130)), params, engine.tokenizer, 256, engine.vocab_size, print
        )
        engine.scheduler.add(seq)

    add("first")
    engine.step()  # its prompt
    assert not calls
    engine.step()  # a decode-only step
    assert calls == [("q4", 1)]
    add("second")
    engine.step()  # the first decodes while the second's prompt is prefilled: one flat batch
    assert calls == [("q4", 1)]
    while engine.scheduler.has_work():
        engine.step()
    assert ("q4", 2) in calls  # both decoding, no prompt: the stack again
