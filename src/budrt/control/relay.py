"""A child's output relayed line by line into the supervisor's logging.

Used when `budrt serve` writes for a person (observe/logging.py `text_logs`): its children then
log JSON into a pipe, and every line comes out through the supervisor's one handler, progress
records as bars. Children writing to the terminal themselves would draw through the bars.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import IO

from budrt.observe.logging import record_from_line
from budrt.observe.progress import process_ended


def relay_lines(stream: IO[bytes], proc: str) -> None:
    """Hand each line of `stream` to the root logger's handlers as a record of `proc`, until the
    child exits (its end of the pipe closes); then close its bars."""
    root = logging.getLogger()
    try:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line:
                root.handle(record_from_line(line, proc))
    finally:
        root.handle(process_ended(proc))
        stream.close()


def copy_lines(stream: IO[bytes], proc: str) -> None:
    """Write each line of `stream` to this process's stdout as it is, until the child exits: the
    output of a spare model server (control/spare.py) when children write for themselves."""
    out = sys.stdout.buffer
    try:
        for raw in stream:
            out.write(raw)
            out.flush()
    finally:
        stream.close()


def start_relay(
    stream: IO[bytes], proc: str, handle: Callable[[IO[bytes], str], None] = relay_lines
) -> threading.Thread:
    """A thread running `handle` (`relay_lines` or `copy_lines`) on the child's output."""
    thread = threading.Thread(target=handle, args=(stream, proc), name=f"relay-{proc}", daemon=True)
    thread.start()
    return thread
