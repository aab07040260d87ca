"""Choose the gateway's hot-path HTTP libraries by measurement (127.0.0.1 only).

    .venv/bin/python bench/http_stack.py [--duration 10] [--rounds 5] [--save]

1. ASGI server (uvicorn+uvloop+httptools vs granian asgi) for a minimal Starlette app.
2. Upstream client in a Starlette proxy on uvicorn: shared aiohttp.ClientSession vs shared
   httpx.AsyncClient, against a direct-to-upstream baseline.
3. Body parsing: json.loads vs orjson.loads vs pydantic model_validate_json.
Load comes from wrk (Debian); the measured server or proxy runs alone on CPU 0, wrk (and the
upstream, in 2.) on CPU 1. Figures are ratios against a baseline from the same invocation, with
A/B runs interleaved over --rounds. granian is optional (not a project dependency).
This file is also the app module the servers import (http_stack:upstream, proxy_aiohttp, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import httpx
from mock_upstream import RESPONSE_BODY  # the same chat-completion body the gateway bench serves
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
PATH = "/v1/chat/completions"
SERVER_CPU, LOADGEN_CPU = "0", "1"

REQUEST_BODY = json.dumps(
    {
        "model": "smollm2-135m-instruct",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer briefly and precisely."},
            {
                "role": "user",
                "content": "Summarise the main trade-offs between latency and throughput "
                "when batching requests on a single GPU inference server.",
            },
        ],
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 256,
        "stream": False,
        "n": 1,
        "stop": ["\n\n"],
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": 1234,
        "user": "bench-user-0001",
    }
).encode()


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stream: bool = False
    n: int = 1
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    user: str | None = None


# ---------------------------------------------------------------- apps served by the subprocesses


async def _complete(request: Request) -> Response:
    await request.body()
    return Response(RESPONSE_BODY, media_type="application/json")


upstream = Starlette(routes=[Route(PATH, _complete, methods=["POST"])])
UPSTREAM_URL = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:1") + PATH
JSON_HEADERS = {"content-type": "application/json"}


@contextlib.asynccontextmanager
async def _aiohttp_client(app):
    connector = aiohttp.TCPConnector(limit=1000, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as app.state.client:
        yield


async def _forward_aiohttp(request: Request) -> Response:
    client = request.app.state.client
    async with client.post(UPSTREAM_URL, data=await request.body(), headers=JSON_HEADERS) as r:
        return Response(await r.read(), status_code=r.status, media_type="application/json")


@contextlib.asynccontextmanager
async def _httpx_client(app):
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=60)
    async with httpx.AsyncClient(limits=limits, timeout=30) as app.state.client:
        yield


async def _forward_httpx(request: Request) -> Response:
    r = await request.app.state.client.post(UPSTREAM_URL, content=await request.body(), headers=JSON_HEADERS)
    return Response(r.content, status_code=r.status_code, media_type="application/json")


proxy_aiohttp = Starlette(routes=[Route(PATH, _forward_aiohttp, methods=["POST"])], lifespan=_aiohttp_client)
proxy_httpx = Starlette(routes=[Route(PATH, _forward_httpx, methods=["POST"])], lifespan=_httpx_client)


# ---------------------------------------------------------------- driver


def server_cmd(kind: str, app: str, port: int) -> list[str]:
    py = sys.executable
    if kind == "uvicorn":
        return [
            py,
            "-m",
            "uvicorn",
            f"http_stack:{app}",
            "--app-dir",
            str(HERE),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    return [
        py,
        "-m",
        "granian",
        "--interface",
        "asgi",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--runtime-threads",
        "1",
        "--runtime-mode",
        "st",
        "--blocking-threads",
        "1",
        "--loop",
        "uvloop",
        "--no-access-log",
        "--log-level",
        "warning",
        "--working-dir",
        str(HERE),
        f"http_stack:{app}",
    ]


@contextlib.contextmanager
def serve(kind: str, app: str, cpu: str, env: dict | None = None):
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["taskset", "-c", cpu, *server_cmd(kind, app, port)],
        cwd=HERE,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                req = urllib.request.Request(url + PATH, data=REQUEST_BODY, headers=JSON_HEADERS)
                with urllib.request.urlopen(req, timeout=2) as r:
                    assert r.read() == RESPONSE_BODY, "unexpected response body"
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} {app} did not come up") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        proc.kill()  # no-op once it has exited


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url: str, conns: int, seconds: float, lua: str) -> dict:
    cmd = [
        "taskset",
        "-c",
        LOADGEN_CPU,
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        lua,
        url + PATH,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if len(pct) != 2 or "Requests/sec" not in out:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(pct["50"]),
        "p99_ms": _ms(pct["99"]),
        "errors": errors,
    }


def measure(targets: dict[str, str], conns: int, args, lua: str) -> dict[str, dict]:
    """Interleave A/B/... over rounds; rps is the mean, latencies the median over rounds."""
    runs: dict[str, list[dict]] = {name: [] for name in targets}
    for _ in range(args.rounds):
        for name, url in targets.items():
            runs[name].append(wrk(url, conns, args.duration / args.rounds, lua))
    return {
        name: {
            "rps": statistics.fmean(r["rps"] for r in rs),
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "errors": sum(r["errors"] for r in rs),
        }
        for name, rs in runs.items()
    }


def run_case(urls: dict[str, str], args, lua: str) -> dict:
    for url in urls.values():
        wrk(url, 64, 2, lua)  # warm-up: 2 s at 64 connections
    c64, c1 = measure(urls, 64, args, lua), measure(urls, 1, args, lua)
    return {
        k: {
            "rps_c64": c64[k]["rps"],
            "p50_ms_c1": c1[k]["p50_ms"],
            "p99_ms_c1": c1[k]["p99_ms"],
            "errors": c64[k]["errors"] + c1[k]["errors"],
        }
        for k in urls
    }


def bench_servers(args, lua: str) -> dict:
    kinds = ["uvicorn"] + (["granian"] if importlib.util.find_spec("granian") else [])
    if len(kinds) == 1:
        print("granian not installed (pip install granian): skipping it", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        urls = {k: stack.enter_context(serve(k, "upstream", SERVER_CPU)) for k in kinds}
        return run_case(urls, args, lua)


def bench_clients(args, lua: str) -> dict:
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(serve("uvicorn", "upstream", LOADGEN_CPU))
        urls = {"direct": up} | {
            c: stack.enter_context(serve("uvicorn", f"proxy_{c}", SERVER_CPU, {"BENCH_UPSTREAM": up}))
            for c in ("aiohttp", "httpx")
        }
        return run_case(urls, args, lua)


def bench_parsing() -> dict:
    os.sched_setaffinity(0, {int(LOADGEN_CPU)})
    cases = {
        "json.loads": "json.loads(BODY)",
        "orjson.loads": "orjson.loads(BODY)",
        "pydantic.model_validate_json": "ChatRequest.model_validate_json(BODY)",
    }
    env = {"json": json, "orjson": __import__("orjson"), "ChatRequest": ChatRequest, "BODY": REQUEST_BODY}
    out = {}
    for name, stmt in cases.items():
        timer = timeit.Timer(stmt, globals=env)
        number, _ = timer.autorange()
        out[name] = {"us_per_op": min(timer.repeat(5, number)) / number * 1e6}
    return out


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s+(.+)", lscpu)
    return {
        "nproc": os.cpu_count(),
        "cpu": model.group(1).strip() if model else platform.processor(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": os.getloadavg()[0],
    }


def report(res: dict) -> None:
    m = res["machine"]
    print(
        f"\n{m['date']} | nproc={m['nproc']} | {m['cpu']} | Python {m['python']} | load avg "
        f"{m['loadavg_at_start']:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    print(
        f"{'case':<38}{'req/s c64':>11}{'x base':>8}{'p50 c1 ms':>11}{'x base':>8}"
        f"{'p99 c1 ms':>11}{'x base':>8}{'errors':>8}"
    )

    def rows(title: str, data: dict, base: str) -> None:
        print(f"-- {title} (baseline: {base})")
        b = data[base]
        for name, r in data.items():
            added = r["p50_ms_c1"] - b["p50_ms_c1"]
            extra = f"   (+{added:.3f} ms p50 over direct)" if base == "direct" and name != base else ""
            print(
                f"{name:<38}{r['rps_c64']:>11.0f}{r['rps_c64'] / b['rps_c64']:>8.2f}"
                f"{r['p50_ms_c1']:>11.3f}{r['p50_ms_c1'] / b['p50_ms_c1']:>8.2f}"
                f"{r['p99_ms_c1']:>11.3f}{r['p99_ms_c1'] / b['p99_ms_c1']:>8.2f}{r['errors']:>8}{extra}"
            )

    rows("1. ASGI server, minimal Starlette app", res["servers"], "uvicorn")
    rows("2. proxy on uvicorn -> upstream", res["clients"], "direct")
    print(f"-- 3. body parsing, {len(REQUEST_BODY)}-byte chat request (baseline: json.loads)")
    base = res["parsing"]["json.loads"]["us_per_op"]
    for name, r in res["parsing"].items():
        print(f"{name:<38}{r['us_per_op']:>9.2f} us/op   x base {r['us_per_op'] / base:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10, help="seconds of load per case (split over rounds)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved A/B rounds per case")
    ap.add_argument("--save", action="store_true", help="write JSON to bench/results/")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    res = {
        "machine": machine(),
        "args": vars(args),
        "pinning": {"server": SERVER_CPU, "wrk": LOADGEN_CPU},
        "request_bytes": len(REQUEST_BODY),
        "response_bytes": len(RESPONSE_BODY),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [==[{REQUEST_BODY.decode()}]==]\n"
        )
    try:
        res["servers"] = bench_servers(args, f.name)
        res["clients"] = bench_clients(args, f.name)
    finally:
        os.unlink(f.name)
    res["parsing"] = bench_parsing()
    report(res)
    if args.save:
        out = HERE / "results" / f"http_stack-{datetime.now():%Y%m%d-%H%M%S}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
