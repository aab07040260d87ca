"""A server process started by a benchmark: wait for it to be ready, stop it, find it a port."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Launched:
    """A server started for a benchmark: its OpenAI base URL and its processes."""

    url: str  # http://host:port/v1
    pid: int  # the process started (budrt: the supervisor)
    log: Path
    ready_s: float  # launch -> health ready
    home: Path | None = None


# Ready times are rounded up by up to one poll: 0.2 s added ~0.1 s on average to both servers'
# start-up. A poll is one request on a kept client: `httpx.get` builds a client (and its TLS
# context) per call, which at this rate took CPU the starting server needed.
POLL_S = 0.02


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    with httpx.Client(timeout=2) as client:
        while True:
            if proc.poll() is not None or time.time() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"{what} did not become ready (see {log}):\n{tail}")
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(POLL_S)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
