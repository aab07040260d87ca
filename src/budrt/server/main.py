"""Run one model-server process (started by the supervisor, or by hand for debugging)."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import sys
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from budrt.config import ModelServerConfig, Settings, load_runtime, reveal
from budrt.model_source import resolve_source
from budrt.observe.logging import setup_logging
from budrt.observe.progress import LogReporter
from budrt.observe.startup import cannot_start, port_problem
from budrt.observe.tracing import setup_tracing
from budrt.protocol.http_server import SERVER_KEEPALIVE_S, BoundedHeadProtocol
from budrt.protocol.spare import SPARE_FLAG, await_orders
from budrt.security import certs


def is_loopback(host: str) -> bool:
    """Reachable from this machine alone: a loopback address or `localhost`."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run_model_server(
    settings: Settings, name: str, port: int | None = None, preload: list[str] | None = None
) -> None:
    server = next((s for s in settings.model_servers if s.name == name), None)
    if server is None:
        raise SystemExit(f"no model server named {name!r} in the configuration")
    if port is not None:  # one replica of several: each has its own port
        server = server.model_copy(update={"port": port})
    internal_key = reveal(settings.internal_key)
    if internal_key is None and not is_loopback(server.host):
        raise SystemExit(
            f"error: model server {name!r} listens on {server.host!r}, beyond this machine, without "
            "an internal credential: anyone reaching the port could skip the gateway's keys and "
            "limits. Set `internal_key` in its settings, or listen on 127.0.0.1."
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # No garbage collection while torch and the server's modules import (each full pass walks
    # millions of their objects: ~0.2 s of every start); they are frozen before serving.
    gc.disable()
    setup_logging(f"model-server:{name}", settings.log_level, settings.log_format)
    if server.threads:
        import torch

        torch.set_num_threads(server.threads)
    _check_can_start(settings, server, name)
    from budrt.engine import kernels

    # Build (first time on this machine) or load the CPU kernels before serving, so that no
    # model load waits on a compiler and every request of this process takes the same path.
    progress = LogReporter("cpu-kernels")  # a build (about a minute) shows as a bar
    try:
        kernels.prepare(progress=progress)
    except Exception as exc:  # a compiler or torch mismatch: the next start fails alike
        cannot_start(settings.home, name, f"the CPU kernels could not be built or loaded: {exc}")
    finally:
        progress.end()
    from budrt.server.app import create_server_app
    from budrt.server.artifacts import artifact_resolver

    cache = settings.artifact_cache_dir or settings.home / "artifacts"
    tls = certs.platform_paths(settings.tls, settings.home)
    app = create_server_app(
        server,
        settings.models,
        preload,
        artifact_resolver(settings),
        cache / "dequantized",
        internal_key=internal_key,
        tls=tls,
        zone=settings.zone,
        tracing=setup_tracing(settings.tracing, "budrt-model-server", resource={"budrt.model_server": name}),
    )
    gc.freeze()  # what the imports made lives as long as the process: no collection walks it again
    gc.enable()
    _serve(app, server, settings, tls)


def _serve(app: ASGIApp, server: ModelServerConfig, settings: Settings, tls: certs.CertPaths | None) -> None:
    """Serves `app` until SIGINT/SIGTERM. With TLS, only a client holding a certificate from the
    platform's CA (a gateway, the supervisor's probes) completes the handshake: nothing else
    reaches a route."""
    context = certs.server_context(tls, require_client_cert=True) if tls is not None else None
    uvicorn.run(
        app,
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=BoundedHeadProtocol,  # httptools, with the request head bounded
        access_log=False,
        log_config=None,
        timeout_keep_alive=SERVER_KEEPALIVE_S,  # outlasts the gateway's idle connections
        timeout_graceful_shutdown=int(settings.supervisor.shutdown_grace_s),
        ssl_context_factory=None if context is None else lambda _config, _default: context,
    )


def _check_can_start(settings: Settings, server: ModelServerConfig, name: str) -> None:
    """What a restart cannot fix ends this process with its reason (observe/startup.py): the port,
    and each model file given by path (registry models are fetched later, and may appear)."""
    problem = port_problem(server.host, server.port) if server.port else None
    if problem is not None:
        cannot_start(settings.home, name, problem)
    for model in (settings.model(m) for m in server.models):
        if model.in_registry:
            continue
        try:
            resolve_source(model.source)
        except (FileNotFoundError, ValueError) as exc:
            cannot_start(settings.home, name, f"model {model.name!r}: {exc}")


def _as_spare() -> list[str]:
    """A spare (control/spare.py): import what every model server imports, then take the
    arguments and environment the supervisor sends."""
    gc.disable()  # as run_model_server does, from here
    import budrt.engine.factory  # noqa: F401 - torch and the engine: the bulk of a start
    import budrt.server.app  # noqa: F401

    return await_orders("budrt.server")


def main() -> None:
    args = sys.argv[1:]
    if args == [SPARE_FLAG]:
        args = _as_spare()
    parser = argparse.ArgumentParser(prog="python -m budrt.server")
    parser.add_argument(
        "--runtime", type=Path, required=True, help="resolved settings JSON from the supervisor"
    )
    parser.add_argument("--name", required=True, help="which model server of the settings to run")
    parser.add_argument("--port", type=int, default=None, help="overrides the configured port")
    parser.add_argument("--preload", default="", help="comma-separated models to load at start")
    options = parser.parse_args(args)
    preload = [m for m in options.preload.split(",") if m]
    run_model_server(load_runtime(options.runtime), options.name, options.port, preload)


if __name__ == "__main__":
    main()
