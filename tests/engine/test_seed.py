"""A seed gives the same tokens whatever shares its steps, on every CPU path this machine runs.

bf16 is where this broke first: oneDNN rounds a row of some linears differently above 32 rows, the
prompt attention (SDPA) rounds differently with where a chunk boundary falls, and cached prefix
blocks of other prompts carry those roundings. The engine computes a seeded request's rows in a
way none of that reaches (step_path: dense weights, EXACT_ROWS rows per call, or int8 weights at any
row count; PrefillChunk.row_lengths, seeded-only prefix blocks); this checks the tokens, alone
against crowded and chunked steps.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from budrt.config import ModelConfig
from budrt.engine.factory import create_text_engine
from budrt.engine.interface import SamplingParams
from budrt.engine.llm_engine import LLMEngine
from budrt.engine.sequence import make_sequence


@pytest.mark.parametrize("int8_linears", [False, None], ids=["dense", "default"])
def test_seeded_tokens_do_not_depend_on_the_batch(
    smollm2_fast: Callable[..., ModelConfig], int8_linears: bool | None
) -> None:
    """`default`: the machine's own choice (fp32: the int8 weights where FBGEMM is; bf16: dense)."""
    cfg = smollm2_fast(max_num_seqs=48, kv_cache_bytes=64 * 1024**2, int8_linears=int8_linears)
    engine = create_text_engine(cfg)
    assert isinstance(engine, LLMEngine)
    tok = engine.tokenizer

    def chat(text: str) -> list[int]:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))

    seeded = SamplingParams(max_tokens=16, temperature=0.9, seed=7)

    def run(others: int, budget: int) -> list[int]:
        engine.scheduler.max_num_batched_tokens = budget
        out: dict[str, list[int]] = {}

        def add(rid: str, ids: list[int], params: SamplingParams) -> None:
            out[rid] = []
            sink = lambda o, r=rid: out[r].extend(o.token_ids)  # noqa: E731
            engine.scheduler.add(make_sequence(rid, ids, params, tok, 256, engine.vocab_size, sink))

        greedy = SamplingParams(max_tokens=24, temperature=0.0)
        for i in range(others):
            add(f"other-{i}", chat(f"Tell me fact number {i} about the sea."), greedy)
        add("seeded", chat("Invent a name for a pet dragon and explain it."), seeded)
        while engine.scheduler.has_work():
            engine.step()
        return out["seeded"]

    alone = run(0, 4096)
    assert len(alone) == 16
    # 40 others: steps of 41 rows (above oneDNN's 32-row switch); then the same with prompts cut
    # into chunks by a small budget; then prompts cut into 16-token chunks at odd places. The
    # seeded prompt's blocks are in the prefix cache from the first run on.
    assert run(40, 4096) == alone
    assert run(40, 512) == alone
    assert run(3, 16) == alone
    assert run(0, 4096) == alone
    other_seed = SamplingParams(max_tokens=16, temperature=0.9, seed=8)
    engine.scheduler.max_num_batched_tokens = 4096
    tokens: list[int] = []
    ids = chat("Invent a name for a pet dragon and explain it.")
    seq = make_sequence(
        "seed-8", ids, other_seed, tok, 256, engine.vocab_size, lambda o: tokens.extend(o.token_ids)
    )
    engine.scheduler.add(seq)
    while engine.scheduler.has_work():
        engine.step()
    assert tokens != alone  # the seed is not ignored
