"""`budrt model-server --name NAME`: what a container runs. No server is started here: the call
into `run_model_server` is replaced, so these tests check the settings it would serve with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from budrt.cli.app import app
from budrt.config import Settings

CONFIG = """models:
  - name: tiny
    task: chat
    format: gguf
    source: /models/tiny.gguf
model_servers:
  - name: text
    models: [tiny]
    host: 0.0.0.0
    port: 8001
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in os.environ if k.startswith("BUDRT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BUDRT_HOME", str(tmp_path / "home"))  # `load` sets it: restored after
    path = tmp_path / "budrt.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Settings, str, Any]]:
    calls: list[tuple[Settings, str, Any]] = []
    monkeypatch.setattr(
        "budrt.server.main.run_model_server",
        lambda settings, name, port: calls.append((settings, name, port)),
    )
    return calls


def test_help_names_the_options() -> None:
    result = CliRunner().invoke(app, ["model-server", "--help"])
    assert result.exit_code == 0
    for option in ("--name", "--config", "--home", "--host", "--port"):
        assert option in result.output


def test_name_is_required(config: Path) -> None:
    result = CliRunner().invoke(app, ["model-server", "--config", str(config)])
    assert result.exit_code == 2


def test_an_unknown_name_says_which_exist(config: Path, served: list[Any]) -> None:
    result = CliRunner().invoke(app, ["model-server", "--name", "txet", "--config", str(config)])
    assert result.exit_code == 2
    assert "no model server named 'txet'" in result.output and "configured: text" in result.output
    assert served == []


def test_serves_the_named_entry(config: Path, served: list[tuple[Settings, str, Any]]) -> None:
    result = CliRunner().invoke(app, ["model-server", "--name", "text", "--config", str(config)])
    assert result.exit_code == 0, result.output
    ((settings, name, port),) = served
    assert (name, port) == ("text", None)
    assert (settings.model_servers[0].host, settings.model_servers[0].port) == ("0.0.0.0", 8001)


def test_host_and_port_override_the_entry(
    config: Path, served: list[tuple[Settings, str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUDRT_CONFIG", str(config))  # as the chart passes it
    args = ["model-server", "--name", "text", "--host", "127.0.0.1", "--port", "9101"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ((settings, name, port),) = served
    assert (settings.model_servers[0].host, name, port) == ("127.0.0.1", "text", 9101)
