"""Baselines measured in the same invocation as the serving run, on the same requests and weights.

- Hugging Face transformers `generate`, one request at a time (greedy, exactly `max_tokens` out).
- The same in static batches (left-padded; each batch runs to its longest `max_tokens`, as a server
  without continuous batching must). Throughput counts only the tokens each request asked for.
- The compute roofline: measured matmul FLOP/s in the engine's dtype / (2 x parameters), the
  tokens/s a perfect engine would reach if every token cost only its weight matmuls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from serve_workload import BenchRequest


def load_hf_model(gguf_path: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    return model.eval()


def _generate(model: Any, batch: list[BenchRequest], pad_id: int) -> float:
    """Seconds to generate every request of `batch` together, left-padded, to the longest max_tokens."""
    width = max(r.prompt_len for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, request in enumerate(batch):
        ids[row, width - request.prompt_len :] = torch.tensor(request.prompt_ids)
        mask[row, width - request.prompt_len :] = 1
    longest = max(r.max_tokens for r in batch)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,  # ignore_eos, like the served requests
            do_sample=False,
            pad_token_id=pad_id,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + longest
    return elapsed


def hf_generate(model: Any, requests: list[BenchRequest], batch_size: int, pad_id: int) -> dict[str, Any]:
    """Output and total tokens/s of transformers `generate` over `requests` in batches of `batch_size`."""
    elapsed = 0.0
    latencies = []
    for i in range(0, len(requests), batch_size):
        seconds = _generate(model, requests[i : i + batch_size], pad_id)
        elapsed += seconds
        latencies.append(seconds)
    output = sum(r.max_tokens for r in requests)
    prompt = sum(r.prompt_len for r in requests)
    return {
        "batch_size": batch_size,
        "requests": len(requests),
        "duration_s": elapsed,
        "output_tokens": output,
        "prompt_tokens": prompt,
        "output_throughput": output / elapsed,
        "total_token_throughput": (prompt + output) / elapsed,
        "mean_batch_latency_s": elapsed / len(latencies),
    }


def matmul_flops(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """Best-of-runs dense matmul FLOP/s for `size`x`size` operands in `dtype` (all torch threads)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(3):  # warm-up: oneDNN picks and caches its kernel
        torch.matmul(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def gguf_parameter_count(gguf_path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(gguf_path).tensors)


def roofline(gguf_path: Path, dtype: torch.dtype) -> dict[str, Any]:
    params = gguf_parameter_count(gguf_path)
    flops = matmul_flops(dtype)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "matmul_gflops": flops / 1e9,
        "parameters": params,
        "tokens_per_s": flops / (2 * params),
    }
