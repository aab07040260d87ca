"""Logs for people on a terminal, JSON for machines: `log_format` auto/json/text."""

from __future__ import annotations

import json
import logging

import pytest

from budrt.observe.logging import setup_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_lines_for_people(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("gateway", "info", "text")
    logging.getLogger("budrt.test").info("started", extra={"fields": {"port": 8000}})
    err = capsys.readouterr().err
    assert "INFO" in err and "gateway" in err and "started  port=8000" in err
    assert not err.lstrip().startswith("{")


def test_json_when_not_a_terminal_or_asked(capsys: pytest.CaptureFixture[str]) -> None:
    for log_format in ("auto", "json"):  # pytest's captured stderr is no terminal
        setup_logging("gateway", "info", log_format)
        logging.getLogger("budrt.test").warning("slow", extra={"fields": {"ms": 12}})
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (line["proc"], line["level"], line["msg"], line["ms"]) == ("gateway", "warning", "slow", 12)
