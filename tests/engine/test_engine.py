"""The batching engine end to end on the default SmolLM2 GGUF (fp32, CPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from budrt.engine.interface import EngineOverloaded, GenerationOutput, SamplingParams
from budrt.engine.llm_engine import LLMEngine

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in one sentence what a CPU does, then give an example of a computer that uses one.",
]


def chat_ids(engine: LLMEngine, prompt: str) -> list[int]:
    return engine.tokenizer.encode(
        engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    )


async def collect(
    engine: LLMEngine, request_id: str, ids: list[int], params: SamplingParams
) -> list[GenerationOutput]:
    return [out async for out in engine.generate(request_id, ids, params)]


def text_of(outputs: list[GenerationOutput]) -> str:
    return "".join(o.text for o in outputs)


def tokens_of(outputs: list[GenerationOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


async def wait_idle(engine: LLMEngine) -> None:
    for _ in range(200):
        if engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


@pytest.fixture(scope="module")
def hf_greedy(engine: LLMEngine, hf_model) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """transformers' own greedy continuations (24 tokens) of PROMPTS, from the same GGUF."""
    model = hf_model
    results = []
    for prompt in PROMPTS:
        ids = torch.tensor([chat_ids(engine, prompt)])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        results.append(out[0, ids.shape[1] :].tolist())
    return results


def _check_same(ours: list[int], reference: list[int], eos: list[int], n: int = 24) -> None:
    # transformers stops at eos; ours ran with ignore_eos, so compare the common prefix.
    reference = reference[:n]
    assert len(ours) == n and ours[: len(reference)] == reference
    assert len(reference) == n or reference[-1] in eos


def test_greedy_matches_transformers_alone_and_batched(engine: LLMEngine, hf_greedy: list[list[int]]) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    eos = engine.tokenizer.eos_token_ids
    for i, prompt in enumerate(PROMPTS):
        outputs = asyncio.run(collect(engine, f"alone-{i}", chat_ids(engine, prompt), greedy))
        _check_same(tokens_of(outputs), hf_greedy[i], eos)

    async def batched() -> list[list[GenerationOutput]]:
        # The first request stops early: the others then decode from non-contiguous cache slots.
        params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)] + [greedy] * 3
        return await asyncio.gather(
            *(collect(engine, f"batch-{i}", chat_ids(engine, p), params[i]) for i, p in enumerate(PROMPTS))
        )

    for i, outputs in enumerate(asyncio.run(batched())):
        _check_same(tokens_of(outputs), hf_greedy[i], eos, 5 if i == 0 else 24)


def test_chat_answers_paris(engine: LLMEngine) -> None:
    ids = chat_ids(engine, "What is the capital of France?")
    outputs = asyncio.run(collect(engine, "paris", ids, SamplingParams(max_tokens=32, temperature=0.0)))
    assert "Paris" in text_of(outputs)
    last = outputs[-1]
    assert last.finish_reason == "stop"  # ended on <|im_end|>
    assert last.prompt_tokens == len(ids)
    assert last.completion_tokens == len(tokens_of(outputs)) == len(outputs)
    assert "<|im_end|>" not in text_of(outputs)


def test_max_tokens_finishes_with_length(engine: LLMEngine) -> None:
    ids = chat_ids(engine, "Tell me a long story.")
    outputs = asyncio.run(collect(engine, "len", ids, SamplingParams(max_tokens=5, temperature=0.0)))
    assert [o.finish_reason for o in outputs] == [None] * 4 + ["length"]
    assert outputs[-1].completion_tokens == 5 and outputs[-1].prompt_tokens == len(ids)


def test_seeded_sampling_is_reproducible_across_batch_mixes(engine: LLMEngine) -> None:
    ids = chat_ids(engine, "Invent a name for a pet dragon.")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    alone = asyncio.run(collect(engine, "seed-alone", ids, params))

    async def mixed() -> list[GenerationOutput]:
        others = [
            collect(
                engine, f"noise-{i}", chat_ids(engine, p), SamplingParams(max_tokens=10 + i, temperature=1.0)
            )
            for i, p in enumerate(PROMPTS[:2])
        ]
        results = await asyncio.gather(*others, collect(engine, "seed-mixed", ids, params))
        return results[-1]

    assert tokens_of(asyncio.run(mixed())) == tokens_of(alone)
    different = asyncio.run(
        collect(engine, "seed-other", ids, SamplingParams(**{**params.__dict__, "seed": 99}))
    )
    assert tokens_of(different) != tokens_of(alone)


def test_stop_string_is_cut_and_not_emitted(engine: LLMEngine) -> None:
    ids = chat_ids(engine, PROMPTS[3])
    full = text_of(
        asyncio.run(collect(engine, "nostop", ids, SamplingParams(max_tokens=24, temperature=0.0)))
    )
    words = full.split()
    stop = " ".join(words[3:5])  # two words: spans several tokens
    assert stop and full.count(stop) >= 1
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=[stop])
    outputs = asyncio.run(collect(engine, "stop", ids, params))
    assert text_of(outputs) == full[: full.index(stop)]
    assert outputs[-1].finish_reason == "stop"

    # A stop token id ends the request the same way.
    first = tokens_of(asyncio.run(collect(engine, "t", ids, SamplingParams(max_tokens=3, temperature=0.0))))
    outputs = asyncio.run(
        collect(
            engine, "stop-id", ids, SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[first[2]])
        )
    )
    assert tokens_of(outputs) == first and outputs[-1].finish_reason == "stop"


def test_utf8_streaming_never_breaks_characters(engine: LLMEngine) -> None:
    ids = chat_ids(engine, "Write the word 'hello' in Japanese, Chinese, Russian and Greek, with an emoji.")
    outputs = asyncio.run(collect(engine, "utf8", ids, SamplingParams(max_tokens=48, temperature=0.0)))
    streamed = text_of(outputs)
    assert any(ord(c) > 127 for c in streamed)
    assert all("\ufffd" not in o.text for o in outputs)
    assert streamed == engine.tokenizer.decode(tokens_of(outputs)).rstrip("\ufffd")


def test_logprobs(engine: LLMEngine) -> None:
    ids = chat_ids(engine, "Say hi.")
    outputs = asyncio.run(
        collect(engine, "lp", ids, SamplingParams(max_tokens=4, temperature=0.0, logprobs=3))
    )
    for out in outputs:
        assert out.logprobs is not None and len(out.logprobs) == 1
        lp = out.logprobs[0]
        assert lp.token_id == out.token_ids[0] and lp.logprob <= 0.0
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the most likely
        assert lp.top[0][2] == pytest.approx(lp.logprob)


def test_penalties_bias_and_truncation(engine: LLMEngine) -> None:
    ids = chat_ids(engine, "Count from one to ten.")
    target = engine.tokenizer.encode(" banana")[0]
    biased = SamplingParams(max_tokens=3, temperature=0.8, seed=1, logit_bias={target: 100.0})
    assert tokens_of(asyncio.run(collect(engine, "bias", ids, biased))) == [target] * 3
    # top_k=1 is greedy whatever the temperature.
    greedy = tokens_of(asyncio.run(collect(engine, "g", ids, SamplingParams(max_tokens=8, temperature=0.0))))
    topk1 = SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=3)
    assert tokens_of(asyncio.run(collect(engine, "k1", ids, topk1))) == greedy
    # A huge frequency penalty forbids repeating any generated token.
    penalized = SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=100.0, ignore_eos=True)
    tokens = tokens_of(asyncio.run(collect(engine, "pen", ids, penalized)))
    assert len(set(tokens)) == len(tokens)


def test_closing_the_stream_aborts_and_frees_the_slot(engine: LLMEngine) -> None:
    async def scenario() -> None:
        ids = chat_ids(engine, "Tell me a very long story about dragons.")
        stream = engine.generate("gone", ids, SamplingParams(max_tokens=400, ignore_eos=True))
        got = [await anext(stream), await anext(stream)]
        assert got[0].finish_reason is None and engine.stats()["running"] == 1
        await stream.aclose()  # the client went away
        await wait_idle(engine)

        # An explicit abort ends the stream with finish_reason "abort".
        outputs: list[GenerationOutput] = []
        async for out in engine.generate("aborted", ids, SamplingParams(max_tokens=400, ignore_eos=True)):
            outputs.append(out)
            if len(outputs) == 2:
                engine.abort("aborted")
        assert outputs[-1].finish_reason == "abort" and len(outputs) < 10
        await wait_idle(engine)

    asyncio.run(scenario())


def test_overloaded_when_waiting_queue_is_full(engine: LLMEngine) -> None:
    async def scenario() -> None:
        ids = chat_ids(engine, "Tell me a story.")
        long = SamplingParams(max_tokens=400, ignore_eos=True)
        streams = [engine.generate(f"full-{i}", ids, long) for i in range(engine.max_num_seqs)]
        for s in streams:  # all slots busy
            await anext(s)
        waiting = [engine.generate(f"wait-{i}", ids, long) for i in range(engine.max_waiting)]
        tasks = [asyncio.ensure_future(anext(w)) for w in waiting]
        for _ in range(100):
            if engine.stats()["waiting"] == engine.max_waiting:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloaded):
            engine.generate("one-too-many", ids, long)
        for t in tasks:  # cancelling a waiting request's stream aborts it
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
        await wait_idle(engine)
        assert engine.stats()["kv_usage"] == 0.0

    asyncio.run(scenario())


def test_step_failure_fails_requests_but_engine_survives(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = engine.runner.run

    def broken(batch):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(engine.runner, "run", real_run)
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.runner, "run", broken)
    ids = chat_ids(engine, "Hello!")
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(collect(engine, "fails", ids, SamplingParams(max_tokens=8)))
    assert engine.is_healthy()
    outputs = asyncio.run(collect(engine, "after", ids, SamplingParams(max_tokens=3, temperature=0.0)))
    assert outputs[-1].finish_reason == "length"


def test_invalid_requests_are_rejected(engine: LLMEngine) -> None:
    with pytest.raises(ValueError):
        asyncio.run(collect(engine, "long", [1] * engine.max_model_len, SamplingParams()))
    with pytest.raises(ValueError):
        asyncio.run(collect(engine, "bad-id", [engine.vocab_size], SamplingParams()))


def test_stats_counts_tokens(engine: LLMEngine) -> None:
    before = engine.stats()
    ids = chat_ids(engine, "Hi")
    outputs = asyncio.run(collect(engine, "stats", ids, SamplingParams(max_tokens=3, temperature=0.0)))
    after = engine.stats()
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == len(ids)
    assert (
        after["generation_tokens_total"] - before["generation_tokens_total"] == outputs[-1].completion_tokens
    )
    assert {"running", "waiting", "kv_usage"} <= after.keys()
