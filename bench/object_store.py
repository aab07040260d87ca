"""Object store throughput: is boto3 in a thread good enough for S3? (127.0.0.1 only.)

    .venv/bin/python bench/object_store.py [--rounds 3] [--aio-python PYTHON] [--save]

Workload, as the gateway would drive it (`asyncio.to_thread` on a store method): objects of 64 KiB
and 4 MiB, at concurrency 1 and 8 (a thread pool of that many workers): N puts of fresh keys, then
N gets of them. Backends: `LocalObjectStore` in a temporary directory (fsynced files), and
`S3ObjectStore` (boto3 in a thread) against SeaweedFS started as the tests start it
(tests/procs.py `S3Server`); then aiobotocore (native asyncio, aiohttp) on the same S3 workload.
No aiobotocore release accepts the botocore that boto3 is pinned with, so aiobotocore runs in an
interpreter that has it, e.g. a throwaway venv (`python -m venv /tmp/aio && /tmp/aio/bin/pip
install aiobotocore`), given as --aio-python; this file is also its worker (it then imports only
aiobotocore and the standard library). Figures per phase: ops/s and MiB/s (median over rounds),
latency p50/p99 over all rounds, and the client process' CPU per operation (the server's is not
counted: on a 2-core machine the server, the client and anything else running share the cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"64KiB": 64 << 10, "4MiB": 4 << 20}
OPS = {"64KiB": 200, "4MiB": 24}  # per phase and round: ~12 and ~96 MiB
CONCURRENCY = (1, 8)
BUCKET = "budrt-bench"
CONTENT_TYPE = "application/octet-stream"

Put = Callable[[str, bytes], Awaitable[None]]
Get = Callable[[str], Awaitable[bytes]]


async def timed_phase(op: Callable[[int], Awaitable[None]], n: int, concurrency: int) -> dict[str, Any]:
    """`op(0..n-1)`, at most `concurrency` at once: wall and CPU seconds, each call's latency."""
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with limit:
            start = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - start)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "latencies": latencies}


async def run_workload(put: Put, get: Get, rounds: int) -> list[dict[str, Any]]:
    """Every size x concurrency x (put, get), `rounds` times, interleaved; one row per cell."""
    raw: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for size_name, size in SIZES.items():
            data = os.urandom(size)
            n = OPS[size_name]
            for concurrency in CONCURRENCY:
                keys = [f"bench/{uuid.uuid4().hex}/{i}" for i in range(n)]

                async def do_put(i: int, keys: list[str] = keys, data: bytes = data) -> None:
                    await put(keys[i], data)

                async def do_get(i: int, keys: list[str] = keys, size: int = size) -> None:
                    if len(await get(keys[i])) != size:
                        raise RuntimeError(f"{keys[i]}: short read")

                with ThreadPoolExecutor(concurrency) as pool:  # to_thread's pool: one thread a call
                    asyncio.get_running_loop().set_default_executor(pool)
                    for op_name, op in (("put", do_put), ("get", do_get)):
                        phase = await timed_phase(op, n, concurrency)
                        raw.setdefault((size_name, concurrency, op_name), []).append({**phase, "n": n})
    return [summarize(*cell, phases) for cell, phases in raw.items()]


def summarize(size_name: str, concurrency: int, op: str, phases: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = sorted(x for p in phases for x in p["latencies"])
    ops_per_s = statistics.median(p["n"] / p["wall"] for p in phases)
    return {
        "size": size_name,
        "concurrency": concurrency,
        "op": op,
        "ops_per_s": round(ops_per_s, 1),
        "mib_per_s": round(ops_per_s * SIZES[size_name] / (1 << 20), 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
        "client_cpu_ms_per_op": round(1000 * sum(p["cpu"] for p in phases) / sum(p["n"] for p in phases), 3),
    }


async def bench_store(store: Any, rounds: int) -> list[dict[str, Any]]:
    """An `ObjectStore` driven as the gateway drives it: each call in a thread."""

    async def put(key: str, data: bytes) -> None:
        await asyncio.to_thread(store.put, key, data, CONTENT_TYPE)

    async def get(key: str) -> bytes:
        got = await asyncio.to_thread(store.get, key)
        return b"" if got is None else got.data

    return await run_workload(put, get, rounds)


async def bench_aiobotocore(endpoint: str, bucket: str, rounds: int) -> dict[str, Any]:
    """The same workload through aiobotocore's native asyncio client (credentials from AWS_*)."""
    import aiobotocore
    import botocore
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "max_attempts": 4},
        max_pool_connections=32,
    )
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=config
    ) as client:

        async def put(key: str, data: bytes) -> None:
            await client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=CONTENT_TYPE)

        async def get(key: str) -> bytes:
            response = await client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return bytes(await body.read())

        rows = await run_workload(put, get, rounds)
    versions = {"aiobotocore": aiobotocore.__version__, "botocore": botocore.__version__}
    return {"versions": versions, "rows": rows}


def aiobotocore_in(python: str, endpoint: str, access_key: str, secret_key: str, rounds: int) -> Any:
    """Run this file's aiobotocore worker under `python`; its rows, or why there are none."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    args = [python, __file__, "--worker", endpoint, "--rounds", str(rounds)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or f"exit {done.returncode}"}
    return json.loads(done.stdout)


def main_bench(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import boto3
    from machine_info import cpu_summary

    from budrt.store.objects import LocalObjectStore
    from budrt.store.s3_objects import S3ObjectStore
    from tests.procs import S3Server

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="budrt-bench-objects-") as tmp:
        results["local"] = asyncio.run(bench_store(LocalObjectStore(Path(tmp)), args.rounds))
    with S3Server(volume_size_mb=1024) as server:
        results["s3_boto3_thread"] = asyncio.run(
            bench_store(S3ObjectStore(server.config(BUCKET)), args.rounds)
        )
        if args.aio_python:
            results["s3_aiobotocore"] = aiobotocore_in(
                args.aio_python, server.endpoint_url, server.access_key, server.secret_key, args.rounds
            )
    return {
        "bench": "object_store",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": cpu_summary(),
        "versions": {"boto3": boto3.__version__, "python": sys.version.split()[0]},
        "workload": {"sizes": SIZES, "ops_per_phase": OPS, "concurrency": CONCURRENCY, "rounds": args.rounds},
        "results": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--aio-python", help="an interpreter with aiobotocore installed (see above)")
    ap.add_argument("--save", action="store_true", help="write JSON to bench/results/")
    ap.add_argument("--worker", metavar="ENDPOINT", help=argparse.SUPPRESS)  # the aiobotocore side
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(bench_aiobotocore(args.worker, BUCKET, args.rounds))))
        return
    report = main_bench(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.save:
        out = ROOT / "bench" / "results" / f"object_store-{report['time'].replace(':', '')}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
