"""Start `budrt serve` with one chat model for a benchmark, and what it costs to have it running.

The server gets a temporary BUDRT_HOME and a free port; `ready_s` is launch -> `/health/ready`.
Its processes (the supervisor, the gateway, a model server per `model_servers` entry) are read
from the supervisor's status file, for their resident memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from launch import Launched, free_port, stop, wait_ready

from budrt.engine.cpu_features import ENV_ISA
from budrt.engine.kernel_build import ENV_SWITCH

BUDRT = str(Path(sys.executable).parent / "budrt")
ADMIN_KEY = "budrt-bench-admin-key-0123456789abcdef0123456789"
TEXT_SERVER = "text"  # the model server's name in the config written here
# Kept between runs (the dequantized GGUF cache lives there), so start-up is measured as a restart,
# as a user sees it after the first start; the first ever start also converts the GGUF (~13 s).
ARTIFACTS = Path(os.environ.get("BUDRT_BENCH_ARTIFACTS") or Path.home() / ".cache/budrt/bench-artifacts")
# The bench's own BUDRT_* environment is dropped (a developer's keys and settings), but for the
# engine's switches: `BUDRT_CPU_ISA=avx2 python bench/serve_compare.py ...` measures the AVX2 path.
ENGINE_SWITCHES = (ENV_ISA, ENV_SWITCH)
KV_LINE = re.compile(
    r"loaded (\S+) from .*\((\S+), max_model_len=(\d+), (\d+) KV blocks of (\d+) tokens(?:, KV (\S+))?\)"
)


@contextmanager
def budrt_serve(
    model: dict[str, Any], threads: int | None = None, timeout: float = 600, home: Path | None = None
) -> Iterator[Launched]:
    """`budrt serve` with only `model` (a ModelConfig dict), on one model server named "text".
    In a new BUDRT_HOME (a first start: its database made, its admin key stored), or in `home`,
    the caller's, kept afterwards (a restart, as a user restarts the platform)."""
    kept = home is not None
    home = home or Path(tempfile.mkdtemp(prefix="budrt-bench-"))
    server: dict[str, Any] = {"name": TEXT_SERVER, "models": [model["name"]]}
    if threads:
        server["threads"] = threads
    config = {"models": [model], "model_servers": [server], "artifact_cache_dir": str(ARTIFACTS)}
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDRT_") or k in ENGINE_SWITCHES}
    env |= {"BUDRT_ADMIN_KEY": ADMIN_KEY, "HF_HUB_OFFLINE": "1"}
    log = home / "serve.log"
    cmd = [BUDRT, "serve", "--home", str(home), "--port", str(port), "--config", str(home / "config.yaml")]
    root = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(proc, f"{root}/health/ready", log, timeout, "budrt serve")
        launched = Launched(f"{root}/v1", proc.pid, log, time.perf_counter() - started, home)
        print(f"budrt serve ready on {root} after {launched.ready_s:.1f}s (home {home})", flush=True)
        yield launched
    finally:
        stop(proc)
    if not kept:
        shutil.rmtree(home, ignore_errors=True)  # only after a clean run: a failed one keeps serve.log


def server_pids(launched: Launched) -> dict[str, int]:
    """name -> pid of each process `budrt serve` started (gateway, model servers)."""
    assert launched.home is not None
    try:
        status = json.loads((launched.home / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return {p["name"]: p["pid"] for p in status.get("processes", []) if p.get("pid")}


def kv_bytes_for(model: dict[str, Any], metadata: dict[str, Any], tokens: int) -> int:
    """The `kv_cache_bytes` that gives `model` (a ModelConfig dict for the GGUF whose `metadata`
    is given) `tokens` KV positions, at the cache dtype the engine will choose for it."""
    import torch

    from budrt.engine.factory import auto_dtype
    from budrt.engine.kv_cache import CACHE_DTYPES, bytes_per_block, cache_dtype

    arch = metadata["general.architecture"]
    heads = int(metadata[f"{arch}.attention.head_count"])
    dtype = model.get("dtype", "auto")
    activations = auto_dtype() if dtype == "auto" else CACHE_DTYPES[dtype]
    element = cache_dtype(model.get("kv_cache_dtype", "auto"), activations, torch.device("cpu"))
    block_size = int(model.get("block_size", 16))
    per_block = bytes_per_block(
        int(metadata[f"{arch}.block_count"]),
        int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
        int(metadata.get(f"{arch}.attention.key_length") or metadata[f"{arch}.embedding_length"] // heads),
        block_size,
        element,
    )
    return -(-tokens // block_size) * per_block


def kv_capacity(launched: Launched) -> dict[str, Any] | None:
    """The text engine's dtype and KV capacity, from the line it logs when loaded."""
    match = KV_LINE.search(launched.log.read_text(errors="replace"))
    if not match:
        return None
    _, dtype, max_len, blocks, block_size, kv_dtype = match.groups()
    return {
        "dtype": dtype.removeprefix("torch."),
        "kv_cache_dtype": kv_dtype or dtype.removeprefix("torch."),
        "max_model_len": int(max_len),
        "kv_tokens": int(blocks) * int(block_size),
    }
