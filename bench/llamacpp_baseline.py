"""Start llama.cpp's server (bench/llamacpp_server.py) with the Python of a baseline venv.

The venv is the caller's choice (`--llamacpp-python`); without one, or without xllamacpp in it,
the baseline is skipped with the reason: budrt's own venv never needs llama.cpp.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from launch import Launched, free_port, stop, wait_ready

SCRIPT = Path(__file__).resolve().parent / "llamacpp_server.py"
SETUP = "python3.11 -m venv V && V/bin/pip install xllamacpp; then pass --llamacpp-python V/bin/python"


def unavailable(python: str | None) -> str | None:
    """Why the llama.cpp baseline cannot run with `python` (None: it can)."""
    if not python:
        return f"no --llamacpp-python given (to create one: {SETUP})"
    if not Path(python).exists():
        return f"{python} does not exist (to create one: {SETUP})"
    probe = subprocess.run(
        [python, "-c", "import xllamacpp"], capture_output=True, text=True, timeout=120, check=False
    )
    if probe.returncode != 0:
        return f"{python} cannot import xllamacpp: {probe.stderr.strip()[-300:]} ({SETUP})"
    return None


@contextmanager
def llamacpp_serve(
    python: str, gguf: Path, parallel: int, ctx: int, threads: int, timeout: float = 300
) -> Iterator[Launched]:
    """llama.cpp's server on `gguf` with `parallel` slots sharing `ctx` KV tokens."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="llamacpp-bench-")) / "server.log"
    cmd = [python, str(SCRIPT), "--model", str(gguf), "--port", str(port)]
    cmd += ["--parallel", str(parallel), "--ctx", str(ctx), "--threads", str(threads)]
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, f"{root}/health", log, timeout, "llama.cpp's server")
        launched = Launched(f"{root}/v1", proc.pid, log, time.perf_counter() - started)
        print(f"llama.cpp's server ready on {root} after {launched.ready_s:.1f}s (log {log})", flush=True)
        yield launched
    finally:
        stop(proc)


def server_info(launched: Launched) -> dict[str, Any]:
    """The JSON line llamacpp_server.py prints once listening (build's CPU features, KV size)."""
    for line in launched.log.read_text(errors="replace").splitlines():
        if line.startswith('{"xllamacpp"'):
            return json.loads(line)
    return {}
