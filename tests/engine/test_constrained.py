"""Constrained decoding in the engine: grammars hold with batching, sampling, seeds, n, logprobs,
stop strings and preemption; unconstrained rows in the same steps are untouched."""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch

from budrt.engine import kernels
from budrt.engine.grammar import Grammar, GrammarError, apply_masks
from budrt.engine.interface import GenerationOutput, SamplingParams
from budrt.engine.kv_cache import KVCache
from budrt.engine.llm_engine import LLMEngine

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def chat_ids(engine: LLMEngine, prompt: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return engine.tokenizer.encode(text, add_special_tokens=False)


async def collect(
    engine: LLMEngine, request_id: str, ids: list[int], params: SamplingParams
) -> list[GenerationOutput]:
    return [out async for out in engine.generate(request_id, ids, params)]


def text_of(outputs: list[GenerationOutput]) -> str:
    return "".join(o.text for o in outputs)


def run_all(engine: LLMEngine, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[GenerationOutput]]:
    async def main() -> list[list[GenerationOutput]]:
        return await asyncio.gather(*(collect(engine, f"c{i}", ids, p) for i, (ids, p) in enumerate(jobs)))

    return asyncio.run(main())


def test_schema_holds_beside_unconstrained_rows_sampled_and_seeded(engine: LLMEngine) -> None:
    person = engine.compile_grammar(Grammar.json_schema(PERSON))
    ids = chat_ids(engine, "Describe a person as JSON.")
    jobs = [(ids, SamplingParams(max_tokens=120, temperature=0.9, seed=i, grammar=person)) for i in range(3)]
    jobs.append((ids, SamplingParams(max_tokens=12, temperature=0.0)))  # unconstrained, same steps
    outputs = run_all(engine, jobs)
    for out in outputs[:3]:
        assert out[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(out)), PERSON)
    alone = run_all(engine, [jobs[3]])[0]
    assert text_of(outputs[3]) == text_of(alone)  # the unconstrained row paid nothing
    again = run_all(engine, [jobs[1]])[0]
    assert text_of(again) == text_of(outputs[1])  # seeded: the same whatever shares the batch


def test_regex_choice_and_lark(engine: LLMEngine) -> None:
    ids = chat_ids(engine, "Give me a date.")
    grammars = {
        "regex": Grammar.regex(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"),
        "choice": Grammar.choice(["yes", "no", 'it "depends"']),
        "lark": Grammar.lark('start: "(" NUMBER ("," NUMBER)* ")"\nNUMBER: /[0-9]{1,3}/'),
    }
    # Seeded: unseeded, the lark row could go on listing numbers past max_tokens (1 run in ~20).
    jobs = [
        (ids, SamplingParams(max_tokens=40, temperature=1.0, seed=11, grammar=engine.compile_grammar(g)))
        for g in grammars.values()
    ]
    regex, choice, lark = (text_of(o) for o in run_all(engine, jobs))
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", regex)
    assert choice in {"yes", "no", 'it "depends"'}
    assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", lark)


def test_n_logprobs_and_stop_strings(engine: LLMEngine) -> None:
    grammar = engine.compile_grammar(Grammar.json_object())
    ids = chat_ids(engine, "A JSON object about cats.")
    params = [
        SamplingParams(max_tokens=60, temperature=0.7, seed=7 + i, logprobs=2, grammar=grammar)
        for i in range(2)
    ]
    for out in run_all(engine, [(ids, p) for p in params]):
        assert out[-1].finish_reason == "length" or isinstance(json.loads(text_of(out)), dict)
        for o in out:
            for lp in o.logprobs or []:
                assert lp.logprob > float("-inf") and len(lp.top) == 2
    # A stop string cuts the output where the client asked, grammar or not.
    cut = run_all(
        engine, [(ids, SamplingParams(max_tokens=60, temperature=0.0, stop=[": "], grammar=grammar))]
    )[0]
    assert cut[-1].finish_reason == "stop" and ": " not in text_of(cut)


def test_cache_by_grammar_text_and_errors(engine: LLMEngine) -> None:
    before = engine.stats()
    first = engine.compile_grammar(
        Grammar.json_schema({"type": "array", "items": {"type": "number"}, "maxItems": 4})
    )
    second = engine.compile_grammar(
        Grammar.json_schema({"type": "array", "items": {"type": "number"}, "maxItems": 4})
    )
    after = engine.stats()
    assert first is second
    assert after["grammar_cache_hits_total"] == before["grammar_cache_hits_total"] + 1
    for bad in (
        Grammar.json_schema({"type": "strin"}),
        Grammar.json_schema({"properties": {"a": {"$ref": "#/nowhere"}}}),
        Grammar.regex("a(b"),
        Grammar.lark("start: undefined_rule"),
    ):
        with pytest.raises(GrammarError):
            engine.compile_grammar(bad)


def test_preempted_constrained_sequences_keep_their_grammar(engine: LLMEngine) -> None:
    """12 blocks of 16 tokens for 4 sequences of ~7 blocks each: running sequences are preempted
    (recomputed); each matcher's state stays with its sequence's tokens, the outputs still parse."""
    args = engine.runner.model.args
    cache = KVCache(args.num_layers, 12, 16, args.num_kv_heads, args.head_dim, torch.float32)
    small = LLMEngine(
        "smollm2-preempt",
        engine.runner.model,
        engine.tokenizer,
        max_model_len=192,
        max_num_seqs=4,
        max_waiting=8,
        cache=cache,
    )
    names = {
        "type": "array",
        "items": {"type": "string", "minLength": 12, "maxLength": 24},
        "minItems": 5,
        "maxItems": 5,
    }
    grammar = small.compile_grammar(Grammar.json_schema(names))
    topics = ("cities", "rivers", "painters", "birds")
    jobs = [
        (
            chat_ids(small, f"Name five {t}."),
            SamplingParams(max_tokens=100, temperature=0.8, seed=i, grammar=grammar),
        )
        for i, t in enumerate(topics)
    ]
    asyncio.run(small.start())
    try:
        outputs = run_all(small, jobs)
    finally:
        asyncio.run(small.stop())
    assert small.stats()["num_preemptions_total"] > 0
    for out in outputs:
        assert out[-1].finish_reason in ("stop", "length")
        if out[-1].finish_reason == "stop":
            jsonschema.validate(json.loads(text_of(out)), names)


def test_jump_forward_appends_forced_tokens_without_a_step_each(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fixed keys and punctuation are appended as soon as they are forced and computed with the
    next step as one chunk: fewer steps than tokens. Not with logprobs (a forced token has none)."""
    schema = {
        "type": "object",
        "properties": {
            "the_full_name_of_the_person": {"type": "string", "maxLength": 16},
            "the_age_of_the_person_in_years": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["the_full_name_of_the_person", "the_age_of_the_person_in_years"],
        "additionalProperties": False,
    }
    grammar = engine.compile_grammar(Grammar.json_schema(schema))
    ids = chat_ids(engine, "Describe a person as JSON.")
    steps = 0
    real_run = engine.runner.run

    def counting(batch):  # type: ignore[no-untyped-def]
        nonlocal steps
        steps += 1
        return real_run(batch)

    monkeypatch.setattr(engine.runner, "run", counting)
    monkeypatch.setattr(engine, "jump_forward", True)  # ModelConfig.jump_forward
    for logprobs, jumps in ((None, True), (1, False)):
        steps = 0
        params = SamplingParams(max_tokens=80, temperature=0.0, logprobs=logprobs, grammar=grammar)
        [out] = run_all(engine, [(ids, params)])
        tokens = out[-1].completion_tokens
        jsonschema.validate(json.loads(text_of(out)), schema)
        assert out[-1].finish_reason == "stop"
        # One step is the prompt's; each sampled token then needs one more, the last one none.
        assert (steps < tokens) if jumps else (steps == tokens), (steps, tokens)


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_masks_become_minus_infinity_on_their_rows_only(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "torch":
        monkeypatch.setenv(kernels.ENV_SWITCH, "torch")
    elif not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")
    torch.manual_seed(0)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32)  # 128 tokens
    bitmask[0, 1], bitmask[1, 2] = 0, -1  # nothing and everything allowed: the kernel's short cuts
    allowed = torch.tensor(
        [[(int(word) >> bit) & 1 for word in row for bit in range(32)] for row in bitmask.tolist()],
        dtype=torch.bool,
    )
    cases = ((128, [0, 1, 2]), (120, [0, 1, 2]), (130, [0, 1, 2]), (128, [1, 3, 4]), (100, [4, 0, 2]))
    for vocab, rows in cases:
        logits = torch.randn(5, vocab)
        expected = logits.clone()
        for k, row in enumerate(rows):
            width = min(vocab, 128)
            expected[row, :width] = expected[row, :width].masked_fill(~allowed[k, :width], float("-inf"))
            expected[row, width:] = float("-inf")
        apply_masks(logits, rows, bitmask)
        assert torch.equal(logits, expected), (path, vocab, rows)


def test_the_same_new_grammar_compiles_once_however_many_ask(engine: LLMEngine) -> None:
    grammar = Grammar.json_schema({"type": "object", "properties": {"unique_key_4711": {"type": "integer"}}})
    before = engine.stats()
    with ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(lambda _: engine.compile_grammar(grammar), range(8)))
    after = engine.stats()
    assert all(c is compiled[0] for c in compiled)
    assert after["grammar_compiles_total"] == before["grammar_compiles_total"] + 1
    assert after["grammar_cache_hits_total"] == before["grammar_cache_hits_total"] + 7
