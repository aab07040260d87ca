"""Image serving: budrt's step-level batching against the diffusers pipeline called directly and
against static batching, on the same model and the same mixed requests, in one run.

    .venv/bin/python bench/image_serving.py --requests 32 --clients 8

The workload: `--requests` prompts of the demo world, each with a step count among 10/20/30 and
`n` of 1 or 2 (fixed by `--seed`), taken by `--clients` closed-loop clients (each sends its next
request when the last one is answered). Three ways to serve them:

- `direct`: the pipeline's own `__call__`, one request at a time (a lock), in this process;
- `static`: up to `--clients` waiting requests batched into one run of the engine, every image
  at the batch's largest step count, the next batch only when the whole batch is done;
- `budrt`: `budrt serve` (gateway + image model server) over HTTP, `response_format: b64_json`.

Then one request alone (20 steps, n=1), `--alone` times each: the bare pipeline call against
budrt over HTTP. Prints JSON with the CPU; images/s, p50/p95 latency per mode, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budrt_server import ADMIN_KEY, budrt_serve  # noqa: E402
from machine_info import cpu_summary  # noqa: E402

from budrt.config import Settings  # noqa: E402
from budrt.engine import openmp  # noqa: E402
from budrt.image import shapes  # noqa: E402
from budrt.image.engine import ImageJob, start_engine  # noqa: E402

Request = dict[str, Any]


def workload(count: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    scenes = shapes.all_scenes()
    return [
        {
            "prompt": rng.choice(scenes).caption(),
            "steps": rng.choice((10, 20, 30)),
            "n": rng.choice((1, 1, 1, 2)),
        }
        for _ in range(count)
    ]


def summary(latencies: list[float], images: int, seconds: float) -> dict[str, float]:
    latencies = sorted(latencies)
    return {
        "images_per_s": round(images / seconds, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "seconds": round(seconds, 2),
    }


def closed_loop(requests: list[Request], clients: int, serve: Any) -> dict[str, float]:
    """`clients` threads take requests in order; `serve(request)` blocks until it is answered."""
    pending = list(reversed(requests))
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                request = pending.pop()
            begun = time.perf_counter()
            serve(request)
            with lock:
                latencies.append(time.perf_counter() - begun)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)
    return summary(latencies, sum(r["n"] for r in requests), time.perf_counter() - started)


def run_direct(pipe: Any, requests: list[Request], clients: int) -> dict[str, float]:
    """One worker thread runs the pipeline (one OpenMP pool, as in a server that calls it)."""
    worker = ThreadPoolExecutor(1)

    def serve(request: Request) -> None:
        steps, n = request["steps"], request["n"]
        worker.submit(pipe, request["prompt"], num_inference_steps=steps, num_images_per_prompt=n).result()

    try:
        return closed_loop(requests, clients, serve)
    finally:
        worker.shutdown()


class StaticBatcher:
    """Fixed batches: whoever waits when the engine is free goes together, to the slowest's steps."""

    def __init__(self, engine: Any, size: int) -> None:
        self.engine, self.size = engine, size
        self.waiting: list[tuple[Request, threading.Event]] = []
        self.lock = threading.Lock()
        self.turn = threading.Lock()

    def serve(self, request: Request) -> None:
        done = threading.Event()
        with self.lock:
            self.waiting.append((request, done))
        with self.turn:  # one batch at a time
            if done.is_set():
                return
            with self.lock:
                batch, self.waiting = self.waiting[: self.size], self.waiting[self.size :]
            steps = max(r["steps"] for r, _ in batch)
            jobs = [self._job(r, steps) for r, _ in batch for _ in range(r["n"])]
            self.engine.submit(jobs)
            for j in jobs:
                j.result.result()
            for _, event in batch:
                event.set()
        done.wait()

    def _job(self, request: Request, steps: int) -> ImageJob:
        cond, uncond = openmp.released(self.engine.denoiser.encode)([request["prompt"]], [""])
        return ImageJob(
            64,
            64,
            cond,
            uncond,
            self.engine.denoiser.default_guidance,
            steps,
            torch.Generator().manual_seed(0),
        )


def run_budrt(url: str, requests: list[Request], clients: int) -> dict[str, float]:
    http = httpx.Client(timeout=600, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def serve(request: Request) -> None:
        body = {"model": "shapes-diffusion", "response_format": "b64_json", **request}
        response = http.post(f"{url}/images/generations", json=body)
        response.raise_for_status()

    return closed_loop(requests, clients, serve)


def alone(call: Any, times: int) -> float:
    call()  # warm
    seconds = []
    for _ in range(times):
        begun = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - begun)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--alone", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    requests = workload(args.requests, args.seed)
    cfg = Settings().model("shapes-diffusion")
    report: dict[str, Any] = {"command": " ".join(["bench/image_serving.py", *sys.argv[1:]]), **cpu_summary()}
    engine = start_engine(cfg.model_copy(update={"max_batch_images": args.clients * 2}))
    pipe = engine.denoiser.pipe
    one = {"prompt": requests[0]["prompt"], "steps": 20, "n": 1}
    report["direct"] = run_direct(pipe, requests, args.clients)
    report["static"] = closed_loop(requests, args.clients, StaticBatcher(engine, args.clients).serve)
    bare_s = alone(openmp.released(lambda: pipe(one["prompt"], num_inference_steps=20)), args.alone)
    engine.stop()
    model = cfg.model_dump(mode="json") | {"max_batch_images": args.clients * 2}
    with budrt_serve(model) as launched:
        report["budrt"] = run_budrt(launched.url, requests, args.clients)
        http = httpx.Client(timeout=600, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        body = {"model": "shapes-diffusion", "response_format": "b64_json", **one}
        budrt_s = alone(
            lambda: http.post(f"{launched.url}/images/generations", json=body).raise_for_status(), args.alone
        )
    report["alone"] = {"bare_pipeline_s": round(bare_s, 4), "budrt_http_s": round(budrt_s, 4)}
    report["ratios"] = {
        "budrt_vs_direct_images_per_s": round(
            report["budrt"]["images_per_s"] / report["direct"]["images_per_s"], 2
        ),
        "budrt_vs_static_images_per_s": round(
            report["budrt"]["images_per_s"] / report["static"]["images_per_s"], 2
        ),
        "budrt_vs_static_p50": round(report["budrt"]["p50_s"] / report["static"]["p50_s"], 2),
        "alone_budrt_vs_bare": round(budrt_s / bare_s, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
