"""Run one model-server process (started by the supervisor, or by hand for debugging)."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

import uvicorn

from budrt.config import Settings, load_runtime, reveal
from budrt.observe.logging import setup_logging
from budrt.protocol.http_server import BoundedHeadProtocol


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
    setup_logging(f"model-server:{name}", settings.log_level)
    if server.threads:
        import torch

        torch.set_num_threads(server.threads)
    from budrt.engine import kernels

    # Build (first time on this machine) or load the CPU kernels before serving, so that no
    # model load waits on a compiler and every request of this process takes the same path.
    kernels.prepare()
    from budrt.server.app import create_server_app
    from budrt.server.artifacts import artifact_resolver

    cache = settings.artifact_cache_dir or settings.home / "artifacts"
    app = create_server_app(
        server,
        settings.models,
        preload,
        artifact_resolver(settings),
        cache / "dequantized",
        internal_key=internal_key,
    )
    uvicorn.run(
        app,
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=BoundedHeadProtocol,  # httptools, with the request head bounded
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.supervisor.shutdown_grace_s),
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m budrt.server")
    parser.add_argument(
        "--runtime", type=Path, required=True, help="resolved settings JSON from the supervisor"
    )
    parser.add_argument("--name", required=True, help="which model server of the settings to run")
    parser.add_argument("--port", type=int, default=None, help="overrides the configured port")
    parser.add_argument("--preload", default="", help="comma-separated models to load at start")
    args = parser.parse_args()
    preload = [m for m in args.preload.split(",") if m]
    run_model_server(load_runtime(args.runtime), args.name, args.port, preload)


if __name__ == "__main__":
    main()
