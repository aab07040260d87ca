"""`budrt serve`: start the model servers and the gateway, keep them alive, stop them cleanly.

The supervisor is the parent of every platform process. It restarts a process that exits or
stops answering its health probe (exponential backoff, a restart budget per hour), publishes
the state of each in `$BUDRT_HOME/run/status.json` for `budrt status`, and on SIGINT/SIGTERM
stops the gateway first (in-flight requests finish), then the model servers.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from pydantic import SecretStr

from budrt.config import DeploymentConfig, ModelServerConfig, Settings, runtime_dump
from budrt.control.processes import ManagedProcess, free_port
from budrt.observe.logging import text_logs
from budrt.observe.startup import EXIT_CANNOT_START, take_reason
from budrt.security import certs
from budrt.security.files import private_dir, write_private

if TYPE_CHECKING:  # imported once the processes run: they start ~50 ms sooner
    import httpx

    from budrt.control.spare import SpareServer

log = logging.getLogger(__name__)
STABLE_AFTER_S = 60.0  # ready this long resets the backoff


def status_path(home: Path) -> Path:
    return home / "run" / "status.json"


def internal_key_path(home: Path) -> Path:
    """This run's internal credential, for `budrt status` to probe the model servers."""
    return home / "run" / "internal.key"


def child_env(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The environment of a child: without the `BUDRT_*` variables that are settings (secrets
    among them); a child takes its settings from its runtime file alone."""
    settings = tuple(f"BUDRT_{name}".upper() for name in Settings.model_fields)

    def is_setting(name: str) -> bool:  # BUDRT_SECRET_KEY, BUDRT_AUTH__JWT__SECRET, ...
        name = name.upper()
        return any(name == s or name.startswith(s + "__") for s in settings)

    env = {k: v for k, v in environ.items() if not is_setting(k)}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def replica_threads(server: ModelServerConfig) -> int | None:
    """Torch threads of each process of `server`: as configured; else, for several replicas, the
    machine's CPUs split between them. Replicas run at once under load, and two processes each
    spinning an OpenMP pool as wide as the machine oversubscribe it (on 2 cores, requests took
    a second each instead of milliseconds: tests/test_drills.py). One process: torch's default."""
    if server.threads is not None or server.replicas == 1:
        return server.threads
    return max(1, (os.cpu_count() or 1) // server.replicas)


def server_settings(settings: Settings, server: ModelServerConfig) -> Settings:
    """The tree a model server gets: its own section, no deployments, the metadata DB only when
    a model of its comes from the registry; `runtime_dump(servers=True)` drops other secrets."""
    needs_db = any(settings.model(m).in_registry for m in server.models)
    update: dict[str, object] = {"model_servers": [server], "deployments": []}
    if not needs_db:
        update |= {"database_url": None, "database_replica_urls": []}
    return settings.model_copy(update=update)


class Supervisor:
    def __init__(self, settings: Settings, spare: SpareServer | None = None) -> None:
        """`spare`: a model server started before the settings were read (control/spare.py),
        which the first model server started takes."""
        self.settings = settings
        self.spare = spare
        self.run_dir = settings.home / "run"
        self.processes: list[ManagedProcess] = []
        self.stopping = False
        self.cannot_start = False  # a process exited with EXIT_CANNOT_START: `run` returns 1
        self.announced_ready = False
        self.env = child_env(os.environ)
        # Model servers require it from every caller (the gateway, the probes): one per run
        # unless configured (servers on other hosts registering by heartbeat need it too).
        self.internal_key = settings.internal_key or SecretStr(secrets.token_urlsafe(32))
        # With `tls.enabled` every hop is HTTPS: the gateway's port, and the model servers',
        # which take only clients with a certificate from the platform's CA.
        self.tls = certs.platform_paths(settings.tls, settings.home)
        self.scheme = "https" if self.tls is not None else "http"
        # Logs for a person: the children log JSON into pipes and their lines come out through
        # this process's handler (control/relay.py), which also draws their progress bars.
        self.relay_output = text_logs(settings.log_format)

    def plan(self) -> Settings:
        """Fix ports, add one deployment per served model, and write the runtime files.

        A model served by several processes (replicas, or several servers listing it) gets one
        deployment with an endpoint per process: the gateway balances and fails over among them.
        """
        servers = []
        replicas: list[tuple[ModelServerConfig, str, int]] = []  # (server, process name, port)
        for server in self.settings.model_servers:
            ports = [
                server.port + i if server.port else free_port(server.host) for i in range(server.replicas)
            ]
            servers.append(server.model_copy(update={"port": ports[0], "threads": replica_threads(server)}))
            for i, port in enumerate(ports):
                name = server.name if server.replicas == 1 else f"{server.name}-{i}"
                replicas.append((server, name, port))
        endpoints: dict[str, list[str]] = {}
        for server, _, port in replicas:
            host = "127.0.0.1" if server.host in ("0.0.0.0", "::") else server.host
            for model in server.models:
                endpoints.setdefault(model, []).append(f"{self.scheme}://{host}:{port}/v1")
        key = self.internal_key
        managed = [
            DeploymentConfig(
                model=name,
                endpoints=urls,
                aliases=self.settings.model(name).aliases,
                api_key=key,  # the gateway's requests and health checks carry it
                managed=True,
                task=self.settings.model(name).task,
            )
            for name, urls in endpoints.items()
        ]
        resolved = self.settings.model_copy(
            update={
                "model_servers": servers,
                "deployments": [*self.settings.deployments, *managed],
                "internal_key": key,
            }
            | ({"log_format": "json"} if self.relay_output else {})
        )
        self._plan_processes(resolved, replicas)
        return resolved

    def _plan_processes(self, resolved: Settings, replicas: list[tuple[ModelServerConfig, str, int]]) -> None:
        """Write the runtime files (the gateway's; one per model server, fewer secrets) and plan
        the processes."""
        private_dir(self.run_dir)
        for stale in self.run_dir.glob("*.cannot-start"):  # a previous run's: not this one's
            stale.unlink(missing_ok=True)
        write_private(internal_key_path(self.settings.home), self.internal_key.get_secret_value().encode())
        runtime = self.run_dir / "runtime.json"
        write_private(runtime, runtime_dump(resolved))
        python = sys.executable
        probe_auth = {"Authorization": f"Bearer {self.internal_key.get_secret_value()}"}
        for resolved_server in resolved.model_servers:
            tree = server_settings(resolved, resolved_server)
            write_private(self._server_runtime(resolved_server.name), runtime_dump(tree, servers=True))
        for server, name, port in replicas:
            server_runtime = self._server_runtime(server.name)
            argv = [python, "-m", "budrt.server", "--runtime", str(server_runtime), "--name", server.name]
            argv += ["--port", str(port)]
            process = ManagedProcess(
                name, "model-server", argv, server.host, port, list(server.models), scheme=self.scheme
            )
            process.probe_headers = probe_auth
            process.relay_output = self.relay_output
            self.processes.append(process)
        gateway = resolved.gateway
        argv = [python, "-m", "budrt.gateway", "--runtime", str(runtime)]
        models = [d.model for d in resolved.deployments]
        process = ManagedProcess(
            "gateway", "gateway", argv, gateway.host, gateway.port, models, scheme=self.scheme
        )
        process.relay_output = self.relay_output
        self.processes.append(process)

    def _probe_verify(self) -> ssl.SSLContext | bool:
        """What the probes trust and present: with TLS, the platform's CA and its client
        certificate, which model servers require; plain HTTP needs nothing."""
        if self.tls is None:
            return True
        return certs.client_context(self.tls, with_client_cert=True)

    def _server_runtime(self, server: str) -> Path:
        return self.run_dir / f"server-{server}.json"

    def _reads_store(self, process: ManagedProcess) -> bool:
        """The gateway, and a model server of a model whose files the registry names."""
        return process.kind == "gateway" or any(self.settings.model(m).in_registry for m in process.models)

    def _record_deployments(self) -> None:
        """Note in the model registry which processes serve each `registry:` model."""
        prefix = "registry:"
        wanted = {
            m.name: m.source[len(prefix) :] for m in self.settings.models if m.source.startswith(prefix)
        }
        serving: dict[str, list[str]] = {}
        for process in self.processes:
            for model in process.models if process.kind == "model-server" else []:
                if model in wanted:
                    serving.setdefault(wanted[model], []).append(process.name)
        if not serving:
            return
        try:
            from budrt.store.models import ModelStore

            store = ModelStore.from_settings(self.settings)
            for record, processes in serving.items():
                store.set_deployments(record, processes)
        except Exception as exc:  # bookkeeping only: never stop the platform from starting
            log.warning("could not record deployments in the model registry: %s", exc)

    def run(self, prepare_store: Callable[[], None] = lambda: None) -> int:
        """Start every process, then keep them running until SIGINT/SIGTERM. The model servers
        that read nothing from the metadata DB start first: their imports and model loads take
        seconds, and `prepare_store` (migrations, the first admin key: ~0.5 s) runs meanwhile.
        The gateway and the servers of registry models read the DB: they start after it."""
        self.plan()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        later = [p for p in self.processes if self._reads_store(p)]
        self._start([p for p in self.processes if p not in later])
        try:
            prepare_store()
        except BaseException:  # e.g. an admin key no gateway would accept: nothing may outlive us
            self.shutdown()
            raise
        self._record_deployments()
        self._start(later)
        if self.spare is not None:  # no model server to take it
            self.spare.discard()
        self.write_status()
        cfg = self.settings.supervisor
        import httpx

        with httpx.Client(timeout=cfg.probe_timeout_s, verify=self._probe_verify()) as client:
            while not self.stopping:
                self.tick(client)
                self.write_status()
                if not self.stopping:
                    time.sleep(cfg.probe_interval_s)
        self.shutdown()
        return 1 if self.cannot_start else 0

    def _start(self, processes: list[ManagedProcess]) -> None:
        for process in processes:
            spare = self.spare if process.kind == "model-server" else None
            spare_pid = spare.pid if spare is not None else None
            process.start(self.env, spare.take if spare is not None else None)
            if spare is not None:
                self.spare = None  # taken, or gone: the next ones start as usual
            how = " (the spare)" if process.pid == spare_pid else ""
            log.info("started %s pid=%s port=%s%s", process.name, process.pid, process.port, how)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def tick(self, client: httpx.Client) -> None:
        now = time.time()
        cfg = self.settings.supervisor
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
            if code == EXIT_CANNOT_START:  # a restart would fail alike: stop everything now
                self._cannot_start(process)
                return
            if code is not None:
                self._schedule_restart(process, f"exited with code {code}", now)
                continue
            healthy = process.probe(client)
            if healthy is None:
                process.probe_failures += 1
                grace = self.settings.supervisor.ready_timeout_s if process.ready_since is None else 0
                if (
                    process.probe_failures >= cfg.probe_failures_before_kill
                    and now - process.started_at > grace
                ):
                    self._kill_and_restart(process, "stopped answering its health probe", now)
                continue
            process.probe_failures = 0
            if process.unhealthy_count >= cfg.unhealthy_before_restart:
                self._kill_and_restart(process, f"unhealthy: {process.health_error}", now)
                continue
            if healthy:
                if process.state != "ready":
                    process.ready_since = now
                    log.info("%s ready in %.1f s", process.name, now - process.started_at)
                process.state = "ready"
                if now - (process.ready_since or now) > STABLE_AFTER_S:
                    process.backoff_s = 0.0
            else:
                process.state = "starting" if process.ready_since is None else "not_ready"
        if not self.announced_ready and all(p.state == "ready" for p in self.processes):
            self.announced_ready = True
            gateway = self.processes[-1]
            print(f"budrt is ready: {gateway.base_url}/v1 (gateway pid {gateway.pid})", flush=True)
            print(f"  models: {', '.join(gateway.models) or 'none'}", flush=True)
            from budrt.store.keys import ADMIN_KEY_FILE

            key_file = self.settings.home / ADMIN_KEY_FILE
            print(f"  keys: the admin key is in {key_file}; more: budrt keys create --name app", flush=True)
            if self.settings.console.enabled:
                print(f"  console: {gateway.base_url}/console (sign in with a key)", flush=True)

    def _cannot_start(self, process: ManagedProcess) -> None:
        """One clear line, then the platform stops and `run` returns 1."""
        # A replica (text-0) reports under its server's name (text).
        names = (process.name, process.name.rsplit("-", 1)[0])
        reason = next((r for n in names if (r := take_reason(self.settings.home, n))), None)
        process.state, process.last_error = "failed", reason or "exited: cannot start"
        # The process said why on the shared stderr (observe/startup.py); this says what follows.
        print(
            f"budrt: stopping: {process.name} cannot start, and a restart would fail alike", file=sys.stderr
        )
        self.cannot_start = True
        self.stopping = True

    def _kill_and_restart(self, process: ManagedProcess, reason: str, now: float) -> None:
        # SIGKILL works on a stopped (SIGSTOP) process too; SIGTERM would wait for SIGCONT.
        process.signal(signal.SIGKILL)
        if process.proc is not None:
            process.proc.wait(timeout=5)
        self._schedule_restart(process, reason, now)

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
            process.wait_relay(timeout=2.0)  # its last lines before ours
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
            "supervisor": {
                "pid": os.getpid(),
                "home": str(self.settings.home),
                "tls_dir": str(self.tls.ca.parent) if self.tls is not None else None,
            },
            "updated_at": round(time.time(), 3),
            "processes": [p.describe() for p in self.processes],
        }
        write_private(status_path(self.settings.home), orjson.dumps(data, option=orjson.OPT_INDENT_2))
