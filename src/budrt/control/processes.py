"""One child process of the platform: how to start it, probe it and stop it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from budrt.control.lifetime import die_with_parent
from budrt.control.relay import copy_lines, relay_lines, start_relay

if TYPE_CHECKING:  # imported once the processes run (Supervisor.run): they start ~50 ms sooner
    import httpx

# A spare model server's `take` (control/spare.py): the spare as the process of these arguments
# and environment, or None.
TakeSpare = Callable[[list[str], dict[str, str]], "subprocess.Popen[bytes] | None"]

ProcessKind = Literal["gateway", "model-server"]
ProcessState = Literal["starting", "ready", "not_ready", "restarting", "failed", "stopping", "stopped"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class ManagedProcess:
    name: str
    kind: ProcessKind
    argv: list[str]
    host: str
    port: int
    models: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    state: ProcessState = "starting"
    restarts: int = 0
    started_at: float = 0.0
    ready_since: float | None = None
    last_error: str | None = None
    probe_failures: int = 0
    next_start_at: float | None = None
    backoff_s: float = 0.0
    restart_times: deque[float] = field(default_factory=deque)
    unhealthy_count: int = 0
    health_error: str | None = None  # the server's own watchdog verdict, last seen
    resident: list[dict[str, object]] = field(default_factory=list)  # from its readiness answer
    held: list[str] = field(default_factory=list)  # models to preload when it is restarted
    probe_headers: dict[str, str] = field(default_factory=dict)  # a model server's: the internal key
    scheme: str = "http"  # "https": the gateway with `tls.enabled`
    relay_output: bool = False  # its stdout and stderr go through the supervisor's logging
    relay: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def label(self) -> str:
        """How its log lines are marked: `gateway`, `model-server:text-0`."""
        return self.name if self.kind == "gateway" else f"{self.kind}:{self.name}"

    def wait_relay(self, timeout: float) -> None:
        """Wait (a bounded time) until its last lines have been relayed."""
        if self.relay is not None:
            self.relay.join(timeout)

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self, env: dict[str, str], take_spare: TakeSpare | None = None) -> None:
        """Start the process, or make a spare model server it (`take_spare`) where one is given."""
        argv = [*self.argv, "--preload", ",".join(self.held)] if self.held else self.argv
        self.proc = take_spare(argv, env) if take_spare is not None else None
        if self.proc is None:
            # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which then
            # stops the children in order (gateway first, so in-flight requests can finish).
            out = subprocess.PIPE if self.relay_output else None
            err = subprocess.STDOUT if self.relay_output else None
            self.proc = subprocess.Popen(
                argv, env=env, start_new_session=True, preexec_fn=die_with_parent, stdout=out, stderr=err
            )
        if self.proc.stdout is not None:  # a spare's output is piped whatever the settings
            handle = relay_lines if self.relay_output else copy_lines
            self.relay = start_relay(self.proc.stdout, self.label, handle)
        self.state, self.started_at, self.ready_since = "starting", time.time(), None
        self.probe_failures, self.unhealthy_count, self.next_start_at = 0, 0, None
        self.resident = []

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def probe(self, client: httpx.Client) -> bool | None:
        """GET /health/ready: True = ready, False = answering but not ready, None = no answer.

        A model server's answer also says whether its watchdog finds it healthy and which
        models it holds; both are kept for `budrt status` and for a restart.
        """
        import httpx

        try:
            response = client.get(f"{self.base_url}/health/ready", headers=self.probe_headers)
        except httpx.HTTPError:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and self.kind == "model-server":
            healthy = body.get("healthy", True) is not False
            self.health_error = body.get("error") or (None if healthy else "unhealthy")
            self.unhealthy_count = 0 if healthy else self.unhealthy_count + 1
            self.resident = [r for r in body.get("resident", []) if isinstance(r, dict)]
            held = [str(r["name"]) for r in self.resident if r.get("state") == "ready"]
            if held or not self.held:
                self.held = held
        return response.status_code == 200

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pid": self.pid,
            "host": self.host,
            "port": self.port,
            "url": self.base_url,
            "state": self.state,
            "restarts": self.restarts,
            "models": self.models,
            "started_at": round(self.started_at, 3) if self.started_at else None,
            "last_error": self.last_error,
            "health_error": self.health_error,
            "resident": self.resident,
        }
