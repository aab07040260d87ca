"""The spare model server `budrt serve` starts before it reads its settings (control/spare.py)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import httpx

from budrt.control.spare import SpareServer
from tests.e2e.conftest import ADMIN_KEY
from tests.test_recovery import MODEL, chat, start_serve, stop_serve, wait_ready
from tests.tiny_models import build_tiny_llama

SERVER = [sys.executable, "-m", "budrt.server"]


def test_a_taken_spare_runs_as_the_model_server_it_is_told_to_be(tmp_path: Path) -> None:
    spare = SpareServer()
    runtime = tmp_path / "no-such-runtime.json"
    proc = spare.take([*SERVER, "--runtime", str(runtime), "--name", "text"], {"PATH": os.environ["PATH"]})
    assert proc is not None and spare.proc is None
    assert spare.take([*SERVER, "--name", "other"], {}) is None  # taken once
    assert proc.stdout is not None
    out = proc.stdout.read()  # until it exits
    assert proc.wait(timeout=60) == 1 and f"No such file or directory: '{runtime}'" in out.decode()


def test_a_dead_spare_is_not_taken_and_one_not_taken_is_stopped() -> None:
    dead = SpareServer()
    assert dead.proc is not None
    dead.proc.kill()
    dead.proc.wait()
    assert dead.take([*SERVER, "--runtime", "r.json", "--name", "text"], {}) is None
    assert dead.proc is None

    unused = SpareServer()
    assert unused.take([sys.executable, "-m", "budrt.gateway"], {}) is None  # not a model server
    proc = unused.proc
    assert proc is not None
    unused.discard()
    assert proc.returncode is not None and unused.proc is None


def test_budrt_serve_gives_the_spare_to_its_first_model_server(tmp_path: Path) -> None:
    """One replica takes the spare, the other starts afresh; both serve, and the spare's command
    line reads as the one it would have been started with."""
    model = {
        "name": MODEL,
        "task": "chat",
        "format": "safetensors",
        "source": str(build_tiny_llama(tmp_path / "tiny")),
        "dtype": "float32",
        "max_model_len": 256,
        "kv_cache_bytes": 8 << 20,
    }
    config = {"models": [model], "model_servers": [{"name": "text", "models": [MODEL], "replicas": 2}]}
    s = start_serve(tmp_path, config)
    try:
        wait_ready(s, 90)
        started = re.findall(r"started (text-\d) pid=(\d+) port=\d+( \(the spare\))?", s.log_tail())
        assert sorted(bool(spare) for _, _, spare in started) == [False, True], s.log_tail()
        spare_pid = next(int(pid) for _, pid, spare in started if spare)
        replicas = [p for p in s.status()["processes"] if p["kind"] == "model-server"]
        assert spare_pid in {p["pid"] for p in replicas}
        cmdline = Path(f"/proc/{spare_pid}/cmdline").read_bytes().decode()
        assert "--spare" not in cmdline and "--runtime" in cmdline and "--name text" in cmdline
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(headers=headers, timeout=30) as client:
            assert [chat(client, s.url) for _ in range(4)] == [200] * 4
    finally:
        stop_serve(s)
