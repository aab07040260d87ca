"""Progress of long work a person waits on: a model's load (bytes read, dequantized, linears
packed), the C++ kernel build, the demo image model's training.

The work takes a `ProgressReporter` and calls `report(phase, done, total)` (default
`NO_PROGRESS`: nothing). A process reports through `LogReporter`: records of the logger
`budrt.progress` with the fields {model, phase, done, total}, at most one per `INTERVAL_S` per
model plus each phase's last. JSON logs carry them as lines; a person's terminal draws them as
bars (observe/terminal.py), also for the model servers of `budrt serve`, whose lines the
supervisor relays (control/relay.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

PROGRESS_LOGGER = "budrt.progress"
INTERVAL_S = 0.25  # at most four records a second per model: the load path pays one clock read
END = "end"  # the phase of the record that closes a model's bars (its load ended or failed)
BYTE_PHASES = frozenset({"read", "dequantize"})  # `done` and `total` count bytes

log = logging.getLogger(PROGRESS_LOGGER)


class ProgressReporter(Protocol):
    def report(self, phase: str, done: int, total: int) -> None:
        """`done` of `total` units of `phase` are done; phases come one after another."""


class _NoProgress:
    def report(self, phase: str, done: int, total: int) -> None:
        return None


NO_PROGRESS: ProgressReporter = _NoProgress()


def amount(phase: str, done: int, total: int) -> str:
    """`4.2/9.0 MB` for a phase counted in bytes, else `3/9`."""
    if phase in BYTE_PHASES:
        return f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"
    return f"{done}/{total}"


class LogReporter:
    """One model's progress as log records, throttled: a record when `interval_s` has passed
    since the last one, and always a phase's last (`done >= total`)."""

    def __init__(
        self, model: str, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.model = model
        self.interval_s = interval_s
        self.clock = clock
        self._last_at = -math.inf
        self._last: tuple[str, int, int] | None = None

    def report(self, phase: str, done: int, total: int) -> None:
        if (phase, done, total) == self._last:
            return
        now = self.clock()
        if done < total and now - self._last_at < self.interval_s:
            return
        self._last_at, self._last = now, (phase, done, total)
        self.emit(phase, done, total, f"{self.model}: {phase} {amount(phase, done, total)}")

    def end(self) -> None:
        """Close the model's bars (after a load, whether it worked or not); nothing if nothing
        was reported."""
        if self._last is not None:
            self._last = None
            self.emit(END, 0, 0, f"{self.model}: progress ended")

    def emit(self, phase: str, done: int, total: int, message: str) -> None:
        fields = {"model": self.model, "phase": phase, "done": done, "total": total}
        log.info(message, extra={"fields": fields})


def progress_fields(record: logging.LogRecord) -> tuple[str, str, int, int] | None:
    """(model, phase, done, total) of a progress record, else None."""
    fields = getattr(record, "fields", None)
    if record.name != PROGRESS_LOGGER or not isinstance(fields, dict):
        return None
    try:
        return str(fields["model"]), str(fields["phase"]), int(fields["done"]), int(fields["total"])
    except (KeyError, TypeError, ValueError):
        return None


def process_ended(proc: str) -> logging.LogRecord:
    """The record that closes every bar of `proc`, a relayed process that exited (an empty model)."""
    fields = {"model": "", "phase": END, "done": 0, "total": 0}
    return logging.makeLogRecord(
        {
            "name": PROGRESS_LOGGER,
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": f"{proc} exited",
            "fields": fields,
            "proc": proc,
        }
    )
