"""Start-up against llama.cpp's server (issue 16: ready ≤ 2x llama.cpp's, to the first token):
each server launched --rounds times, alternating, on the same GGUF, with the same number of
sequences and KV tokens as bench/serve_compare.py gives them (64, 32,768).

    .venv/bin/python bench/startup.py --llamacpp-python V/bin/python            # 5 rounds
    .venv/bin/python bench/startup.py --llamacpp-python V/bin/python --rounds 9

A start is timed from the launch of the server's process to `/health/ready` (llama.cpp's
`/health`), and to the answer of a one-token completion sent then: the first token. budrt is
started as a user starts it (`budrt serve` with one model, bench/budrt_server.py) after a first,
untimed start that fills its dequantized GGUF cache and its BUDRT_HOME (the database, the admin
key), so every timed start is a restart, in the same home, as a user restarts the platform.
Prints medians, the ratio and every round; writes bench/results/startup-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_compare  # noqa: E402
from baselines import LLAMACPP, baseline_serve, unavailable  # noqa: E402
from budrt_server import ADMIN_KEY, budrt_serve  # noqa: E402
from launch import Launched  # noqa: E402
from machine_info import cpu_summary  # noqa: E402
from serve_client import closed_loop  # noqa: E402
from serve_compare import DEFAULT_SOURCE, MODEL  # noqa: E402
from serve_workload import BenchRequest  # noqa: E402

from budrt.model_source import resolve_source  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPT_IDS = [1, 9690, 314, 253, 1345, 30]  # a few tokens of SmolLM2's vocabulary


def first_token(launched: Launched, admin_key: str) -> float:
    """Launch -> the answer to one 1-token completion sent once the server is ready."""
    request = BenchRequest(0, [], PROMPT_IDS, 1)
    results, duration = asyncio.run(
        closed_loop(launched.url, admin_key, MODEL, [request], 1, lambda r: r.completion_body(MODEL, 0.0))
    )
    if not results[0].ok:
        raise RuntimeError(f"the first request failed: {results[0].error}")
    return launched.ready_s + duration


def budrt_model(args: argparse.Namespace) -> dict[str, Any]:
    """serve_compare's model: `--parallel` sequences, and `--kv-tokens` as llama.cpp has."""
    compare = argparse.Namespace(source=args.source, concurrency=[args.parallel], llamacpp_ctx=args.kv_tokens)
    return serve_compare.budrt_model(compare, "")


def budrt_start(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    with budrt_serve(budrt_model(args), args.threads, home=home) as launched:
        return {"ready_s": launched.ready_s, "first_token_s": first_token(launched, ADMIN_KEY)}


def llamacpp_start(args: argparse.Namespace, gguf: Path) -> dict[str, Any]:
    with baseline_serve(
        LLAMACPP, args.llamacpp_python, gguf, args.parallel, args.kv_tokens, args.threads
    ) as launched:
        return {"ready_s": launched.ready_s, "first_token_s": first_token(launched, "unused")}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=DEFAULT_SOURCE)
    p.add_argument("--llamacpp-python", help="python of a venv with xllamacpp")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--parallel", type=int, default=64, help="sequences decoded together (llama.cpp's slots)")
    p.add_argument("--kv-tokens", type=int, default=32768, help="KV cache tokens of each server")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    gguf = resolve_source(args.source)
    skipped = unavailable(LLAMACPP, args.llamacpp_python)
    if skipped:
        print(f"llama.cpp skipped: {skipped}", flush=True)
    home = Path(tempfile.mkdtemp(prefix="budrt-bench-home-"))  # one BUDRT_HOME: each start a restart
    budrt_start(args, home)  # untimed: fills the dequantized cache and the home, loads pages
    rounds: dict[str, list[dict[str, Any]]] = {"budrt": [], "llama.cpp": []}
    for round_ in range(args.rounds):
        if not skipped:
            rounds["llama.cpp"].append(llamacpp_start(args, gguf))
        rounds["budrt"].append(budrt_start(args, home))
        print(f"round {round_ + 1}: " + json.dumps({k: v[-1] for k, v in rounds.items() if v}), flush=True)
    shutil.rmtree(home, ignore_errors=True)
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in ("ready_s", "first_token_s")}
        for name, runs in rounds.items()
        if runs
    }
    result: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_summary(),
        "load_average": os.getloadavg(),
        "rounds": rounds,
        "medians": medians,
    }
    if "llama.cpp" in medians:
        budrt, llamacpp = medians["budrt"], medians["llama.cpp"]
        result["first_token_ratio"] = budrt["first_token_s"] / llamacpp["first_token_s"]
    args.out_dir.mkdir(exist_ok=True)
    path = args.out_dir / f"startup-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("medians", "first_token_ratio") if k in result}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
