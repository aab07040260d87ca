"""Paged KV cache, chunked prefill, prefix caching and preemption, checked against transformers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from budrt.engine.interface import GenerationOutput, SamplingParams
from budrt.engine.kv_cache import KVCache
from budrt.engine.llm_engine import LLMEngine
from budrt.engine.sequence import Sequence, make_sequence

# Eight chat prompts of different lengths (the longest spans several KV blocks).
GREEDY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in one sentence what a CPU does, then give an example of a computer that uses one.",
    "Give me a recipe for pancakes with exact quantities.",
    "Translate 'good morning, how are you today?' into Spanish and German.",
    "What is 17 times 23? Show the steps of the multiplication.",
    "Describe the water cycle to a ten year old child in a few short sentences, mentioning clouds.",
]
GREEDY_TOKENS = 16


@pytest.fixture(scope="module")
def hf_greedy8(engine: LLMEngine, hf_model) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """transformers' own greedy continuations of GREEDY_PROMPTS (chat-formatted), same GGUF."""
    model = hf_model
    results = []
    for prompt in GREEDY_PROMPTS:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ids = torch.tensor([engine.tokenizer.encode(text)])
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS, do_sample=False
            )
        results.append(out[0, ids.shape[1] :].tolist())
    return results


GREEDY = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)


def sibling(engine: LLMEngine, **overrides: Any) -> LLMEngine:
    """Another engine over the session engine's (fp32) model, with its own KV cache and limits."""
    kwargs: dict[str, Any] = dict(
        max_model_len=512,
        max_num_seqs=8,
        max_waiting=32,
        max_num_batched_tokens=512,
        enable_prefix_caching=True,
        dtype=torch.float32,
    )
    num_blocks = overrides.pop("num_blocks", 96)
    kwargs.update(overrides)
    args = engine.runner.model.args
    cache = KVCache(args.num_layers, num_blocks, 16, args.num_kv_heads, args.head_dim, torch.float32)
    return LLMEngine("smollm2-paged", engine.runner.model, engine.tokenizer, cache=cache, **kwargs)


def chat(engine: LLMEngine, prompt: str) -> list[int]:
    return engine.tokenizer.encode(
        engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    )


async def _collect(engine: LLMEngine, rid: str, ids: list[int], params: SamplingParams) -> list[int]:
    outputs: list[GenerationOutput] = [o async for o in engine.generate(rid, ids, params)]
    return [t for o in outputs for t in o.token_ids]


def run(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, together: bool
) -> list[list[int]]:
    async def scenario() -> list[list[int]]:
        await engine.start()
        try:
            if together:
                jobs = (_collect(engine, f"r{i}", ids, params) for i, ids in enumerate(prompts))
                return list(await asyncio.gather(*jobs))
            return [await _collect(engine, f"a{i}", ids, params) for i, ids in enumerate(prompts)]
        finally:
            await engine.stop()

    return asyncio.run(scenario())


def assert_matches(ours: list[list[int]], reference: list[list[int]], eos: list[int]) -> None:
    for i, (got, ref) in enumerate(zip(ours, reference, strict=True)):
        # transformers stops at eos; ours ignores it, so compare the common prefix.
        assert got[: len(ref)] == ref, f"prompt {i}: {got} != {ref}"
        assert len(got) == GREEDY_TOKENS and (len(ref) == GREEDY_TOKENS or ref[-1] in eos)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"enable_prefix_caching": False}, id="no-prefix-cache"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill-16"),
        pytest.param({"num_blocks": 12}, id="preemption"),
    ],
)
def test_greedy_matches_transformers_paged(
    engine: LLMEngine, hf_greedy8: list[list[int]], overrides: dict[str, Any]
) -> None:
    eng = sibling(engine, **overrides)
    prompts = [chat(eng, p) for p in GREEDY_PROMPTS]
    eos = eng.tokenizer.eos_token_ids
    assert_matches(run(eng, prompts, GREEDY, together=True), hf_greedy8, eos)
    stats = eng.stats()
    if "num_blocks" in overrides:  # 8 sequences of ~4 blocks each cannot all fit 12 blocks
        assert stats["num_preemptions_total"] > 0
    if "max_num_batched_tokens" in overrides:
        # Alone, after the batch: every prompt's blocks come back from the prefix cache.
        hits = stats["prefix_cache_hits_total"]
        assert_matches(run(eng, prompts, GREEDY, together=False), hf_greedy8, eos)
        assert eng.stats()["prefix_cache_hits_total"] > hits
    assert eng.stats()["kv_usage"] == 0.0  # every block went back


def test_prefix_cache_reuses_a_long_shared_prefix(engine: LLMEngine) -> None:
    document = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(40))
    first = chat(engine, f"{document}\nHow many items are there?")
    second = chat(engine, f"{document}\nWhich color is item 7?")
    assert len(first) > 300
    cached, uncached = sibling(engine), sibling(engine, enable_prefix_caching=False)
    run(cached, [first], GREEDY, together=True)
    before = cached.stats()
    got = run(cached, [second], GREEDY, together=True)
    after = cached.stats()
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"] == common // 16 * 16
    assert after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"] == len(second)
    assert got == run(uncached, [second], GREEDY, together=True)
    assert uncached.stats()["prefix_cache_hits_total"] == 0


def _manual(eng: LLMEngine, rid: str, ids: list[int], params: SamplingParams, out: list[int]) -> Sequence:
    """A sequence driven by calling `eng.step()` by hand (no step thread)."""

    def sink(item: GenerationOutput | BaseException) -> None:
        assert isinstance(item, GenerationOutput)
        out.extend(item.token_ids)

    seq = make_sequence(rid, ids, params, eng.tokenizer, eng.max_model_len, eng.vocab_size, sink)
    eng.scheduler.add(seq)
    return seq


def test_same_prompt_twice_shares_blocks(engine: LLMEngine) -> None:
    eng = sibling(engine)
    ids = chat(eng, GREEDY_PROMPTS[7])
    outs: list[list[int]] = [[], []]
    seqs = [_manual(eng, f"n{i}", ids, GREEDY, outs[i]) for i in range(2)]
    eng.step()  # both admitted and prefilled together
    full = len(ids) // 16
    assert seqs[0].block_table[:full] == seqs[1].block_table[:full]
    assert eng.blocks.num_blocks - eng.blocks.num_free == eng.blocks.blocks_needed(len(ids)) + 1
    while eng.scheduler.has_work():
        eng.step()
    assert outs[0] == outs[1] and len(outs[0]) == GREEDY_TOKENS
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_freed_blocks_are_evicted_least_recently_used_first(engine: LLMEngine) -> None:
    eng = sibling(engine, num_blocks=8)
    blocks = eng.blocks
    one = SamplingParams(max_tokens=1, temperature=0.0)
    a, b = list(range(100, 132)), list(range(200, 232))  # two full blocks each
    for ids in (a, b):
        _manual(eng, f"p{ids[0]}", ids, one, [])
        while eng.scheduler.has_work():
            eng.step()
    assert len(blocks.hash_to_block) == 4
    # A 5-block prompt takes the 4 never-used blocks first, then evicts a's first block: the oldest.
    _manual(eng, "big", list(range(300, 380)), one, [])
    eng.step()
    hits = blocks.prefix_hits
    _manual(eng, "b-again", b, one, [])
    while eng.scheduler.has_work():
        eng.step()
    assert blocks.prefix_hits - hits == 32  # b survived whole


def test_engine_metrics_are_exported(engine: LLMEngine) -> None:
    from budrt.server.metrics import EngineStatsCollector

    eng = sibling(engine)
    ids = chat(eng, GREEDY_PROMPTS[0])
    run(eng, [ids, ids], SamplingParams(max_tokens=4, temperature=0.0), together=True)
    pool = SimpleNamespace(models={"m": SimpleNamespace(state="ready", engine=eng, stepping_engine=eng)})
    families = {f.name: f for f in EngineStatsCollector(pool).collect()}  # type: ignore[arg-type]
    for name in ("budrt:num_requests_running", "budrt:kv_cache_usage_perc", "budrt:prefix_cache_queries"):
        assert name in families
    assert families["budrt:prefix_cache_queries"].samples[0].value == 2 * len(ids)
    itl = {s.name: s.value for s in families["budrt:inter_token_latency_seconds"].samples}
    assert itl["budrt:inter_token_latency_seconds_count"] == 2 * 3
    queue = {s.name: s.value for s in families["budrt:request_queue_time_seconds"].samples}
    assert queue["budrt:request_queue_time_seconds_count"] == 2
