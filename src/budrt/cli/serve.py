"""`budrt serve|gateway|status` and `budrt config show`: run the platform and look at it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from budrt.cli.common import AsJson, ConfigFile, Home, fail, load

if TYPE_CHECKING:
    from budrt.config import Settings

serve_app = typer.Typer()  # its commands are top-level: `budrt serve`, not `budrt serve serve`
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)

Host = Annotated[str | None, typer.Option("--host", help="Address the gateway listens on.")]
Port = Annotated[int | None, typer.Option("--port", help="Port the gateway listens on (default 8000).")]


def _prepare_store(settings: Settings) -> None:
    """Migrate the metadata DB and create the first admin key (printed once)."""
    from budrt.store.db import migrate
    from budrt.store.keys import ADMIN_KEY_FILE, KeyStore

    migrate(settings.database_url_resolved)
    try:
        admin = KeyStore.from_settings(settings).ensure_admin(settings)
    except ValueError as exc:  # a BUDRT_ADMIN_KEY no gateway would accept
        fail(str(exc), 2)
    if admin is not None:
        typer.echo(f"admin key: {admin} (saved to {settings.home / ADMIN_KEY_FILE})")


Tls = Annotated[
    bool,
    typer.Option(
        "--tls",
        help="Every hop over TLS (tls.enabled): HTTPS at the gateway, mutual TLS to model servers, "
        "certificates made under $BUDRT_HOME/tls when missing.",
    ),
]


LogFormat = Annotated[
    str | None,
    typer.Option(
        "--log-format", help="auto (lines on a terminal, else JSON), json or text.", show_default=False
    ),
]


@serve_app.command()
def serve(
    ctx: typer.Context,
    host: Host = None,
    port: Port = None,
    home: Home = None,
    config: ConfigFile = None,
    tls: Tls = False,
    log_format: LogFormat = None,
) -> None:
    """Start the gateway and the model servers behind it, under a supervisor."""
    from budrt.control.spare import SpareServer

    # The one `budrt` started (cli/__init__.py), else one now: its imports overlap the settings'.
    spare = ctx.obj if isinstance(ctx.obj, SpareServer) else SpareServer()
    try:
        from budrt.control.supervisor import Supervisor
        from budrt.observe.logging import setup_logging

        settings = load(config, home, host, port, tls, log_format)
        setup_logging("supervisor", settings.log_level, settings.log_format)
        code = Supervisor(settings, spare).run(lambda: _prepare_store(settings))
    finally:
        spare.discard()  # not taken: a bad config, or no model server
    raise typer.Exit(code)


@serve_app.command()
def gateway(
    host: Host = None,
    port: Port = None,
    home: Home = None,
    config: ConfigFile = None,
    log_format: LogFormat = None,
) -> None:
    """Run a gateway alone, in front of the upstreams named in the config's `deployments`."""
    from budrt.gateway.main import run_gateway

    run_gateway(load(config, home, host, port, log_format=log_format))


def _model_cell(name: str, resident: dict[str, Any]) -> str:
    """`smollm2 (ready, 310 MiB, float32, avx2 kernels)`: state, memory, and how a text model runs."""
    parts = [resident["state"], f"{int(resident.get('memory_bytes') or 0) >> 20} MiB"]
    runtime = resident.get("runtime") or {}
    if runtime:
        kernels = f"{runtime.get('kernel_level')} kernels" if runtime.get("kernels_loaded") else "torch paths"
        parts += [str(runtime.get("dtype")), kernels]
    return f"{name} ({', '.join(parts)})"


def _print_status_table(data: dict[str, Any], home: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"budrt at {home} ({'running' if data['running'] else 'stopped'})")
    for column in ("name", "kind", "pid", "port", "state", "restarts", "models", "last error"):
        table.add_column(column)
    for p in data["processes"]:
        resident = {r["name"]: r for r in p.get("resident") or []}
        models = [_model_cell(m, resident[m]) if m in resident else m for m in p["models"]]
        table.add_row(
            p["name"],
            p["kind"],
            str(p["pid"]),
            str(p["port"]),
            p["state"],
            str(p["restarts"]),
            ", ".join(models),
            p.get("health_error") or p.get("last_error") or "",
        )
    console = Console()
    console.print(table)
    for row in data.get("models", []):
        for warning in row["warnings"]:
            console.print(f"warning: {row['model']}: {warning}")


@serve_app.command()
def status(as_json: AsJson = False, home: Home = None, config: ConfigFile = None) -> None:
    """Show every process of the running platform: pid, port, state, models."""
    from budrt.control.status import platform_status

    settings = load(config, home)
    data = platform_status(settings.home)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_status_table(data, settings.home)
    raise typer.Exit(0 if data["running"] else 1)


@config_app.command("show")
def config_show(home: Home = None, config: ConfigFile = None) -> None:
    """Print the effective configuration (secrets masked) as YAML."""
    import yaml

    yaml.safe_dump(load(config, home).masked(), sys.stdout, sort_keys=False)
