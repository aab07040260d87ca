"""What a restart cannot fix ends `budrt serve` at once, with one clear line and a non-zero exit
code, instead of a process restarted every few seconds for ever: the gateway's port in use, a
model file that is not there."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from budrt.observe.startup import EXIT_CANNOT_START, port_problem
from tests.procs import free_port
from tests.test_recovery import Serve, start_serve

CONFIG: dict[str, object] = {"models": [], "model_servers": [], "deployments": []}


def _ended(serve: Serve, timeout: float = 60) -> tuple[int, str]:
    try:
        code = serve.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        serve.proc.kill()
        raise AssertionError("budrt serve kept running:\n" + serve.log_tail()) from None
    return code, (serve.home / "serve.log").read_text()


def test_the_gateway_port_in_use_stops_serve(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_problem("127.0.0.1", port) == (
            f"port {port} on 127.0.0.1 is already in use (another budrt, or another program?)"
        )
        code, log = _ended(start_serve(tmp_path, CONFIG, port=port))
    assert code == 1, log
    line = f"error: gateway cannot start: port {port} on 127.0.0.1 is already in use"
    assert line in log and "choose another with --port" in log
    assert "budrt: stopping: gateway cannot start, and a restart would fail alike" in log
    assert "restarted gateway" not in log  # no restart was tried
    assert port_problem("127.0.0.1", free_port()) is None


def test_a_model_file_that_is_not_there_stops_serve(tmp_path: Path) -> None:
    config = {
        "models": [
            {"name": "ghost", "task": "chat", "format": "gguf", "source": str(tmp_path / "none.gguf")}
        ],
        "model_servers": [{"name": "text", "models": ["ghost"]}],
        "deployments": [],
    }
    code, log = _ended(start_serve(tmp_path, config))
    assert code == 1, log
    assert "error: text cannot start: model 'ghost': model source" in log and "does not exist" in log
    assert "budrt: stopping: text cannot start" in log
    assert "restarted text" not in log
    assert EXIT_CANNOT_START == 78
