"""Start-up failures that no restart can fix (a port in use, a model file that is not there, a
kernel build that fails): the process writes why to `$home/run/<process>.cannot-start`, prints
one line and exits with EX_CONFIG (78). The supervisor, seeing that code, stops the platform at
once with that line, instead of restarting the process every few seconds for ever."""

from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path
from typing import NoReturn

EXIT_CANNOT_START = 78  # sysexits.h EX_CONFIG: a restart would fail the same way


def reason_path(home: Path, process: str) -> Path:
    return Path(home) / "run" / f"{process}.cannot-start"


def cannot_start(home: Path, process: str, reason: str) -> NoReturn:
    """Record `reason` for the supervisor, say it on stderr, exit 78."""
    path = reason_path(home, process)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(reason + "\n")
    except OSError:
        pass  # the line on stderr still says it
    print(f"error: {process} cannot start: {reason}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CANNOT_START)


def take_reason(home: Path, process: str) -> str | None:
    """The reason a process of this name recorded (and forget it: the next start is new)."""
    path = reason_path(home, process)
    try:
        reason = path.read_text().strip()
    except OSError:
        return None
    path.unlink(missing_ok=True)
    return reason or None


def port_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on, or None. Checked before serving, so that a port in
    use is a start-up failure with its own message, not a server exiting after its first log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (another budrt, or another program?)"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None
