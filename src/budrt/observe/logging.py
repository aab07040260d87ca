"""Logs on stderr: one JSON object per line, the same shape in every process; or, on a terminal
(`log_format: auto`, the default) or with `text`, short coloured lines for a person to read.

A line logged while a request is handled carries its `request_id` (the `x-request-id` the caller
gets) and, with tracing on, its `trace_id` (observe/tracing.py): a gateway's lines and the model
server's lines of one request share both.

Progress records (observe/progress.py) are JSON lines like any other; on a terminal they are
drawn as bars (observe/terminal.py). `budrt serve` on a terminal has its children log JSON into
pipes and shows their records through its own handler (`record_from_line`, control/relay.py)."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from budrt.observe.tracing import current_request


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "proc": self.process_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request = current_request()
        if request is not None:
            entry["request_id"] = request.request_id
            if (trace_id := request.trace_id) is not None:
                entry["trace_id"] = trace_id
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`gateway  started on ...  key=value`: the process, the message, then its fields; the time
    and level are the handler's columns (rich). Tracebacks follow as text."""

    def __init__(self, process_name: str) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        proc = getattr(record, "proc", None) or self.process_name  # a relayed child's own name
        line = f"{proc:<12} {record.getMessage()}"
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict) and extra:
            line += "  " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:  # a relayed record's traceback, as text
            line += "\n" + record.exc_text
        return line


_JSON_KEYS = ("ts", "level", "proc", "logger", "msg", "exc")


def record_from_line(line: str, proc: str) -> logging.LogRecord:
    """A line a child process wrote, as a record of `proc`: its JSON log record back (what
    `JsonFormatter` wrote), or the line as it came (`raw`: a traceback, a compiler's output)."""
    entry = None
    if line.startswith("{"):
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            entry = None
    if not isinstance(entry, dict) or "msg" not in entry:
        raw = {"name": "budrt.relay", "levelno": logging.INFO, "levelname": "INFO", "raw": True}
        return logging.makeLogRecord(raw | {"msg": line, "proc": proc})
    level = logging.getLevelName(str(entry.get("level", "info")).upper())
    level = level if isinstance(level, int) else logging.INFO
    record = logging.makeLogRecord(
        {
            "name": str(entry.get("logger", "")),
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "msg": str(entry["msg"]),
            "proc": proc,
            "fields": {k: v for k, v in entry.items() if k not in _JSON_KEYS},
            "exc_text": entry.get("exc"),
        }
    )
    if isinstance(entry.get("ts"), int | float):
        record.created = float(entry["ts"])  # when the child logged it
    return record


def text_logs(log_format: str) -> bool:
    """Whether logs are for a person: `text`, or `auto` with stderr on a terminal."""
    return log_format == "text" or (log_format == "auto" and sys.stderr.isatty())


def _handler(process_name: str, log_format: str) -> logging.Handler:
    """JSON unless a person reads it; then lines and progress bars (observe/terminal.py)."""
    if not text_logs(log_format):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(process_name))
        return handler
    from rich.console import Console

    from budrt.observe.terminal import TextHandler

    text = TextHandler(process_name, Console(stderr=True))
    text.setFormatter(TextFormatter(process_name))
    return text


def setup_logging(process_name: str, level: str = "info", log_format: str = "auto") -> None:
    handler = _handler(process_name, log_format)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore", "alembic"):  # alembic: a line per plugin
        logging.getLogger(noisy).setLevel("WARNING")
