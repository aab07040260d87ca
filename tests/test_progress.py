"""Progress of long work (observe/progress.py): what a real model load reports, the throttle on
its log records, JSON lines in JSON mode, and bars on a terminal (observe/terminal.py), also for
the lines `budrt serve` relays from its children (control/relay.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from budrt.config import Settings
from budrt.control.processes import ManagedProcess
from budrt.control.relay import relay_lines
from budrt.control.supervisor import Supervisor
from budrt.observe.logging import TextFormatter, record_from_line, setup_logging
from budrt.observe.progress import END, PROGRESS_LOGGER, LogReporter, progress_fields
from budrt.observe.terminal import TextHandler
from tests.tiny_models import build_tiny_llama, tiny_config

Report = tuple[str, int, int]


class Recorder:
    def __init__(self) -> None:
        self.reports: list[Report] = []

    def report(self, phase: str, done: int, total: int) -> None:
        self.reports.append((phase, done, total))


class RecordingLogReporter(LogReporter):
    """Every record it would log, kept instead."""

    def __init__(
        self, model: str, interval_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(model, interval_s, clock)
        self.records: list[Report] = []

    def emit(self, phase: str, done: int, total: int, message: str) -> None:
        self.records.append((phase, done, total))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


def assert_monotone(reports: list[Report]) -> list[str]:
    """Phases one after another (none comes back), each counting up to its total; their order."""
    phases: list[str] = []
    last: dict[str, int] = {}
    for phase, done, total in reports:
        if not phases or phases[-1] != phase:
            assert phase not in phases, f"{phase} came back: {reports}"
            phases.append(phase)
        assert 0 <= done <= total, (phase, done, total)
        assert done >= last.get(phase, 0), f"{phase} went back: {reports}"
        last[phase] = done
    for phase in phases:
        final = [r for r in reports if r[0] == phase][-1]
        assert final[1] == final[2], f"{phase} did not finish: {final}"
    return phases


def test_a_real_load_reports_each_phase_up_to_its_total(tiny_model: Path) -> None:
    from budrt.engine.factory import create_text_engine

    recorder = Recorder()
    create_text_engine(tiny_config("tiny", tiny_model), "cpu", recorder)
    phases = assert_monotone(recorder.reports)
    assert [p for p in phases if p != "compile"] == ["read", "pack"]  # compile: kernels not built yet
    read_total = recorder.reports[-1 - [r[0] for r in reversed(recorder.reports)].index("read")][2]
    assert read_total == (tiny_model / "model.safetensors").stat().st_size - _header_bytes(tiny_model)


def _header_bytes(directory: Path) -> int:
    raw = (directory / "model.safetensors").read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")


def test_a_gguf_reports_its_bytes_dequantized(tmp_path: Path) -> None:
    import gguf

    from budrt.engine.gguf_loader import load_gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 64), ("embedding_length", 8), ("block_count", 1)):
        getattr(writer, f"add_{key}")(value)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(32)
    rng = np.random.default_rng(0)
    for name, shape in (("token_embd.weight", (32, 8)), ("output_norm.weight", (8,))):
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((16, 8)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    recorder = Recorder()
    load_gguf(path, recorder)
    assert assert_monotone(recorder.reports) == ["dequantize"]
    assert recorder.reports[-1] == ("dequantize", (32 * 8 + 8 + 16 * 8) * 4, (32 * 8 + 8 + 16 * 8) * 4)


def test_a_kernel_build_reports_compile_and_a_cached_one_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from budrt.engine import kernel_build

    library = tmp_path / "kernels.so"
    monkeypatch.setattr(kernel_build, "library_path", lambda level: library)
    monkeypatch.setattr(kernel_build, "build", lambda level: library.touch())  # no compiler run
    monkeypatch.setattr(kernel_build, "_load_library", lambda name, path: object())
    recorder = Recorder()
    kernel_build.load("avx2", True, recorder)
    assert recorder.reports == [("compile", 0, 1), ("compile", 1, 1)]
    kernel_build.load("avx2", True, recorder)  # built: loaded, nothing to wait for
    assert len(recorder.reports) == 2


def test_a_pool_load_reports_then_closes_its_bars(tiny_model: Path) -> None:
    from budrt.server.model_pool import ModelPool

    reporters: list[RecordingLogReporter] = []

    def reporter(model: str) -> RecordingLogReporter:
        reporters.append(RecordingLogReporter(model))
        return reporters[-1]

    async def load() -> str:
        pool = ModelPool([tiny_config("tiny", tiny_model, preload=True)], progress=reporter)
        await pool.preload()
        state = pool.models["tiny"].state
        await pool.close()
        return state

    assert asyncio.run(load()) == "ready"
    (used,) = reporters
    assert used.records[-1] == (END, 0, 0)
    assert "pack" in assert_monotone(used.records[:-1])


def test_records_are_throttled_but_each_phase_ends_at_its_total() -> None:
    now = [0.0]
    reporter = RecordingLogReporter("tiny", 0.25, lambda: now[0])
    seconds, calls = 5.0, 10_000
    for phase in ("read", "pack"):
        for i in range(calls + 1):
            now[0] += seconds / calls
            reporter.report(phase, i, calls)
        reporter.report(phase, calls, calls)  # said twice: logged once
    simulated = 2 * seconds
    assert len(reporter.records) <= simulated / 0.25 + 1 + 2  # four a second, plus each phase's last
    assert [r for r in reporter.records if r[1] == r[2]] == [("read", calls, calls), ("pack", calls, calls)]
    assert_monotone(reporter.records)


def test_end_says_nothing_when_nothing_was_reported() -> None:
    reporter = RecordingLogReporter("tiny")
    reporter.end()
    assert reporter.records == []


def test_json_logs_carry_progress_records_not_bars(capsys: pytest.CaptureFixture[str]) -> None:
    for log_format in ("json", "auto"):  # auto: pytest's captured stderr is no terminal
        setup_logging("model-server:text", "info", log_format)
        reporter = LogReporter("tiny")
        reporter.report("read", 5_000_000, 10_000_000)
        reporter.report("read", 10_000_000, 10_000_000)
        reporter.end()
        err = capsys.readouterr().err
        assert "━" not in err  # no bar drawn
        lines = [json.loads(line) for line in err.strip().splitlines()]
        fields = [(r["model"], r["phase"], r["done"], r["total"]) for r in lines]
        assert fields == [
            ("tiny", "read", 5_000_000, 10_000_000),
            ("tiny", "read", 10_000_000, 10_000_000),
            ("tiny", END, 0, 0),
        ]
        assert {r["logger"] for r in lines} == {PROGRESS_LOGGER}
        assert lines[0]["proc"] == "model-server:text" and lines[0]["msg"] == "tiny: read 5.0/10.0 MB"


def plain(out: io.StringIO) -> str:
    """What a terminal shows, without its colours and cursor moves."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())


def terminal() -> tuple[TextHandler, io.StringIO]:
    """The handler of text logs on a (forced) terminal, installed as the root's only one."""
    out = io.StringIO()
    handler = TextHandler("model-server:text", Console(force_terminal=True, file=out, width=120))
    handler.setFormatter(TextFormatter("model-server:text"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel("INFO")
    return handler, out


def test_a_terminal_shows_bars_per_model_and_phase() -> None:
    handler, out = terminal()
    reporter = LogReporter("tiny", interval_s=0.0)
    reporter.report("read", 5_000_000, 10_000_000)
    logging.getLogger("budrt.test").info("a line meanwhile")
    assert handler.bars is not None and handler.bars._bars is not None  # drawing
    reporter.report("read", 10_000_000, 10_000_000)
    reporter.report("pack", 9, 9)
    reporter.end()
    assert handler.bars._bars is None  # every bar full: the live display stopped
    text = plain(out)
    assert "a line meanwhile" in text
    assert "model-server:text  tiny  read" in text and "10.0/10.0 MB" in text
    assert "model-server:text  tiny  pack" in text and "9/9" in text
    assert "{" not in text


def test_relayed_lines_come_out_as_records_and_bars_close_when_the_child_exits() -> None:
    handler, out = terminal()
    progress = {"model": "tiny", "phase": "read", "done": 3, "total": 10, "logger": PROGRESS_LOGGER}
    lines = [
        json.dumps({"ts": 1.0, "level": "info", "proc": "x", "msg": "m"} | progress),
        json.dumps({"ts": 1.0, "level": "warning", "proc": "x", "logger": "budrt.t", "msg": "slow", "ms": 5}),
        "Traceback (most recent call last):",
    ]
    relay_lines(io.BytesIO("\n".join(lines).encode() + b"\n"), "model-server:text-0")
    assert handler.bars is not None and handler.bars._bars is None  # the child is gone: so are its bars
    text = plain(out)
    assert "WARNING" in text and "model-server:text-0 slow  ms=5" in text
    assert "model-server:text-0 Traceback (most recent call last):" in text


def test_a_json_line_reads_back_as_its_record() -> None:
    line = json.dumps({"ts": 2.5, "level": "error", "proc": "x", "logger": PROGRESS_LOGGER, "msg": "m"})
    record = record_from_line(line[:-1] + ', "model": "a", "phase": "pack", "done": 1, "total": 2}', "p")
    assert (record.levelno, record.created, record.proc) == (logging.ERROR, 2.5, "p")  # type: ignore[attr-defined]
    assert progress_fields(record) == ("a", "pack", 1, 2)
    raw = record_from_line("not json {", "p")
    assert raw.raw and raw.getMessage() == "not json {" and progress_fields(raw) is None  # type: ignore[attr-defined]


def test_serve_on_a_terminal_relays_its_children_which_log_json(tmp_path: Path) -> None:
    servers = [{"name": "text", "models": ["smollm2-135m-instruct"]}]
    settings = Settings(home=tmp_path, log_format="text", model_servers=servers)
    supervisor = Supervisor(settings)
    supervisor.plan()
    runtime = json.loads((tmp_path / "run" / "server-text.json").read_text())
    assert runtime["log_format"] == "json"  # for the supervisor to read back
    assert all(p.relay_output for p in supervisor.processes)
    as_json = Supervisor(settings.model_copy(update={"log_format": "json"}))
    as_json.plan()  # JSON for machines: the children write to stderr themselves, as before
    assert not any(p.relay_output for p in as_json.processes)


def test_a_relayed_child_s_output_reaches_the_handler() -> None:
    handler, out = terminal()
    script = (
        "import json; print(json.dumps({'level': 'info', 'logger': 'budrt.progress', 'msg': 'm', "
        "'model': 'tiny', 'phase': 'read', 'done': 1, 'total': 4})); print('plain line')"
    )
    child = ManagedProcess("text", "model-server", [sys.executable, "-c", script], "127.0.0.1", 0)
    child.relay_output = True
    child.start({})
    assert child.proc is not None and child.proc.wait(timeout=30) == 0
    child.wait_relay(timeout=10)
    assert "model-server:text plain line" in plain(out)
    assert handler.bars is not None and handler.bars._bars is None
