"""Decode speed on one CUDA GPU: budrt's engine vs transformers `generate`, same random weights.

    python bench/gpu_bench.py [--batches 1 32] [--new-tokens 128] [--json out.json]

The model is Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads, 8 KV heads, head_dim 64,
intermediate 8192, vocab 128256, tied embeddings) with random bf16 weights: speed does not depend
on the values, and nothing needs downloading. The weights are written once as a safetensors
directory; budrt loads it through its real factory (`create_text_engine(cfg, "cuda")`), and
transformers runs the very same tensors.

Decode rate (both engines alike): run every batch with 1 and with N new tokens, then
  decode tok/s = batch x (N - 1) / (time(N) - time(1)),
which leaves out prefill and start-up. Decode bandwidth = weight bytes x decode steps/s (every step
reads all weights once), shown as a fraction of this card's device-to-device copy rate (bytes read
+ written per second by a plain torch copy of a large tensor): how close decoding is to the memory
bound. Speed is measured here only, never in the unit tests; run by bench/gpu.sh on a lent GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "src"):  # runnable from a bare checkout (no installed budrt)
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="concurrent sequences")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (N)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="prompt length of every sequence")
    ap.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"], help="fewer = quicker")
    ap.add_argument("--skip-hf", action="store_true", help="only budrt's engine")
    ap.add_argument("--json", type=Path, help="also write the results here")
    # A CPU run only checks that the script works (tiny settings); its numbers mean nothing.
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes`."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * nbytes * repeats / seconds


def write_model(directory: Path, layers: int, device: str) -> Any:
    """Random bf16 weights (transformers' own init) on the GPU, saved with a byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import build_tiny_llama

    config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers}, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(str(directory))
    # The tokenizer only frames prompts (ids < 300); generated ids beyond it decode to nothing.
    tiny = build_tiny_llama(directory / "tiny-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tiny / name).read_bytes())
    return model


def prompts(batch: int, length: int, vocab: int = 250) -> list[list[int]]:
    """Distinct prompts of equal length (no padding for transformers; no prefix-cache hits)."""
    return [[5 + (i * 31 + j * 7) % vocab for j in range(length)] for i in range(batch)]


def time_budrt(engine: Any, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    from budrt.engine.interface import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    ids = prompts(batch, prompt_tokens)

    async def one(i: int) -> int:
        rid = f"b{batch}-n{new_tokens}-{i}-{time.perf_counter_ns()}"
        return sum([len(out.token_ids) async for out in engine.generate(rid, ids[i], params)])

    async def run() -> float:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(batch)))
        assert counts == [new_tokens] * batch, counts
        return time.perf_counter() - start

    return asyncio.run(run())


def time_hf(model: Any, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    import torch

    device = str(model.device)
    ids = torch.tensor(prompts(batch, prompt_tokens), device=device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    sync(device)
    assert out.shape == (batch, prompt_tokens + new_tokens), out.shape
    return time.perf_counter() - start


def decode_rate(timer: Any, batch: int, args: argparse.Namespace) -> float:
    """Decode tokens/s: the difference between an N-token and a 1-token run (after a warm-up)."""
    timer(batch, args.prompt_tokens, 4)  # warm-up: kernels, allocator, handles
    one = min(timer(batch, args.prompt_tokens, 1) for _ in range(2))
    full = timer(batch, args.prompt_tokens, args.new_tokens)
    return batch * (args.new_tokens - 1) / max(full - one, 1e-9)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure")
        return 2
    from budrt.config import ModelConfig
    from budrt.engine.factory import create_text_engine

    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    copy_bps = copy_bandwidth(device, 1 << 30 if device.startswith("cuda") else 1 << 26)
    print(f"{name}; torch {torch.__version__}; device-to-device copy {copy_bps / 1e12:.2f} TB/s (read+write)")
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "copy_bytes_per_s": copy_bps}

    with tempfile.TemporaryDirectory(prefix="budrt-gpu-bench-") as tmp:
        directory = Path(tmp) / "llama-1b-random"
        started = time.perf_counter()
        hf_model = write_model(directory, args.layers, device)
        print(f"random model written in {time.perf_counter() - started:.1f}s")
        longest = args.prompt_tokens + args.new_tokens
        kv_bytes = 2 * args.layers * 8 * 64 * 2 * longest * max(args.batches) * 2  # 2x headroom
        cfg = ModelConfig(
            name="llama-1b-random",
            task="chat",
            format="safetensors",
            source=str(directory),
            dtype="auto",
            max_model_len=max(longest, 256),
            max_num_seqs=max(args.batches),
            max_waiting=max(args.batches),
            max_num_batched_tokens=max(args.batches) * args.prompt_tokens,
            kv_cache_bytes=max(kv_bytes, 256 << 20),
            enable_prefix_caching=False,
        )
        started = time.perf_counter()
        engine = create_text_engine(cfg, device)
        print(f"budrt engine loaded in {time.perf_counter() - started:.1f}s ({engine.dtype})")
        weights = {p.data_ptr(): p.numel() * p.element_size() for p in engine.runner.model.parameters()}
        weight_bytes = sum(weights.values())  # tied embeddings counted once
        results["weight_bytes"] = weight_bytes
        asyncio.run(engine.start())
        engines: dict[str, Any] = {"budrt": lambda b, p, n: time_budrt(engine, b, p, n)}
        if not args.skip_hf:
            engines["transformers"] = lambda b, p, n: time_hf(hf_model, b, p, n)
        rows = []
        for label, timer in engines.items():
            for batch in args.batches:
                rate = decode_rate(timer, batch, args)
                steps = rate / batch
                fraction = weight_bytes * steps / copy_bps
                rows.append({"engine": label, "batch": batch, "decode_tok_s": rate, "bw_fraction": fraction})
                print(
                    f"{label:12s} batch {batch:3d}: decode {rate:9.1f} tok/s = {steps:7.1f} steps/s; "
                    f"weights {weight_bytes * steps / 1e9:.0f} GB/s = {fraction:.0%} of the copy rate",
                    flush=True,
                )
        asyncio.run(engine.stop())
        results["runs"] = rows
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
