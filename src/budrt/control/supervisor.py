"""`budrt serve`: start the model servers and the gateway, keep them alive, stop them cleanly.

The supervisor is the parent of every platform process. It restarts a process that exits or
stops answering its health probe (exponential backoff, a restart budget per hour), publishes
the state of each in `$BUDRT_HOME/run/status.json` for `budrt status`, and on SIGINT/SIGTERM
stops the gateway first (in-flight requests finish), then the model servers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import orjson

from budrt.config import DeploymentConfig, Settings, runtime_dump
from budrt.control.processes import ManagedProcess, free_port

log = logging.getLogger(__name__)
PROBE_INTERVAL_S = 1.0
PROBE_FAILURES_BEFORE_KILL = 5  # ~5-10 s without an answer = hung (e.g. SIGSTOP)
STABLE_AFTER_S = 60.0  # ready this long resets the backoff


def status_path(home: Path) -> Path:
    return home / "run" / "status.json"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = settings.home / "run"
        self.processes: list[ManagedProcess] = []
        self.stopping = False
        self.announced_ready = False
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def plan(self) -> Settings:
        """Fix ports, add a deployment per served model, and write the runtime file."""
        servers = []
        for server in self.settings.model_servers:
            port = server.port or free_port(server.host)
            servers.append(server.model_copy(update={"port": port}))
        managed = []
        for server in servers:
            host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
            for name in server.models:
                model = self.settings.model(name)
                managed.append(
                    DeploymentConfig(
                        model=name,
                        endpoints=[f"http://{host}:{server.port}/v1"],
                        aliases=model.aliases,
                        managed=True,
                        task=model.task,
                    )
                )
        resolved = self.settings.model_copy(
            update={"model_servers": servers, "deployments": [*self.settings.deployments, *managed]}
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        runtime = self.run_dir / "runtime.json"
        fd = os.open(runtime, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(runtime_dump(resolved))
        python = sys.executable
        for server in servers:
            argv = [python, "-m", "budrt.server", "--runtime", str(runtime), "--name", server.name]
            self.processes.append(
                ManagedProcess(
                    server.name, "model-server", argv, server.host, server.port, list(server.models)
                )
            )
        gateway = resolved.gateway
        argv = [python, "-m", "budrt.gateway", "--runtime", str(runtime)]
        models = [d.model for d in resolved.deployments]
        self.processes.append(ManagedProcess("gateway", "gateway", argv, gateway.host, gateway.port, models))
        return resolved

    def run(self) -> int:
        self.plan()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for process in self.processes:
            process.start(self.env)
            log.info("started %s pid=%s port=%s", process.name, process.pid, process.port)
        self.write_status()
        with httpx.Client(timeout=2.0) as client:
            while not self.stopping:
                self.tick(client)
                self.write_status()
                time.sleep(PROBE_INTERVAL_S)
        self.shutdown()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def tick(self, client: httpx.Client) -> None:
        now = time.time()
        for process in self.processes:
            if process.state == "failed":
                continue
            if process.state == "restarting":
                if process.next_start_at is not None and now >= process.next_start_at:
                    process.restarts += 1
                    process.start(self.env)
                    log.warning(
                        "restarted %s pid=%s (restart %d)", process.name, process.pid, process.restarts
                    )
                continue
            code = process.exited()
            if code is not None:
                self._schedule_restart(process, f"exited with code {code}", now)
                continue
            healthy = process.probe(client)
            if healthy is None:
                process.probe_failures += 1
                grace = self.settings.supervisor.ready_timeout_s if process.ready_since is None else 0
                if (
                    process.probe_failures >= PROBE_FAILURES_BEFORE_KILL
                    and now - process.started_at > grace + 5
                ):
                    process.signal(signal.SIGKILL)
                    process.proc.wait(timeout=5) if process.proc else None
                    self._schedule_restart(process, "stopped answering its health probe", now)
                continue
            process.probe_failures = 0
            if healthy:
                if process.state != "ready":
                    process.ready_since = now
                process.state = "ready"
                if now - (process.ready_since or now) > STABLE_AFTER_S:
                    process.backoff_s = 0.0
            else:
                process.state = "starting" if process.ready_since is None else "not_ready"
        if not self.announced_ready and all(p.state == "ready" for p in self.processes):
            self.announced_ready = True
            gateway = self.processes[-1]
            print(f"budrt is ready: {gateway.base_url}/v1 (gateway pid {gateway.pid})", flush=True)

    def _schedule_restart(self, process: ManagedProcess, reason: str, now: float) -> None:
        cfg = self.settings.supervisor
        process.last_error = reason
        log.error("%s (pid %s) %s", process.name, process.pid, reason)
        while process.restart_times and now - process.restart_times[0] > 3600:
            process.restart_times.popleft()
        if len(process.restart_times) >= cfg.max_restarts_per_hour:
            process.state = "failed"
            log.error("%s exceeded its restart budget; giving up", process.name)
            return
        process.restart_times.append(now)
        process.backoff_s = min(cfg.restart_backoff_max_s, max(cfg.restart_backoff_s, process.backoff_s * 2))
        process.state, process.next_start_at = "restarting", now + process.backoff_s

    def shutdown(self) -> None:
        grace = self.settings.supervisor.shutdown_grace_s
        deadline = time.time() + grace + 3.0
        gateways = [p for p in self.processes if p.kind == "gateway"]
        servers = [p for p in self.processes if p.kind != "gateway"]
        for group, share in ((gateways, grace), (servers, 3.0)):
            for process in group:
                process.state = "stopping"
                process.signal(signal.SIGTERM)
            self.write_status()
            group_deadline = min(deadline, time.time() + share)
            for process in group:
                self._wait(process, group_deadline)
        for process in self.processes:
            process.state = "stopped"
        self.write_status(running=False)
        print("budrt stopped", flush=True)

    @staticmethod
    def _wait(process: ManagedProcess, deadline: float) -> None:
        if process.proc is None:
            return
        try:
            process.proc.wait(timeout=max(0.1, deadline - time.time()))
        except Exception:
            process.signal(signal.SIGKILL)
            process.proc.wait(timeout=5)

    def write_status(self, running: bool = True) -> None:
        data = {
            "running": running,
            "supervisor": {"pid": os.getpid(), "home": str(self.settings.home)},
            "updated_at": round(time.time(), 3),
            "processes": [p.describe() for p in self.processes],
        }
        path = status_path(self.settings.home)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        tmp.replace(path)
