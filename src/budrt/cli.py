"""`budrt`: the command line. Thin: every command loads the settings tree and calls one part."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from budrt.cli_identity import (
    ImagesDay,
    ImagesMonth,
    Rpm,
    TokensDay,
    TokensMonth,
    Tpm,
    roles_app,
    teams_app,
    users_app,
)
from budrt.cli_models import models_app
from budrt.config import Settings, load_settings
from budrt.security.files import secure_home

app = typer.Typer(help="budrt: a self-hosted OpenAI-compatible serving platform.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
app.add_typer(users_app, name="users")
app.add_typer(teams_app, name="teams")
app.add_typer(roles_app, name="roles")
app.add_typer(models_app, name="models")

Home = Annotated[Path | None, typer.Option("--home", help="Data directory (same as BUDRT_HOME).")]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML configuration file.", exists=True, dir_okay=False)
]
Host = Annotated[str | None, typer.Option("--host", help="Address the gateway listens on.")]
Port = Annotated[int | None, typer.Option("--port", help="Port the gateway listens on (default 8000).")]


def _settings(
    config: Path | None, home: Path | None, host: str | None = None, port: int | None = None, **extra: Any
) -> Settings:
    try:
        settings = load_settings(config, home=home, gateway={"host": host, "port": port}, **extra)
    except Exception as exc:  # a config error is the user's to fix: say what, no traceback
        typer.echo(f"error: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from None
    os.environ["BUDRT_HOME"] = str(settings.home)
    secure_home(settings.home)  # 0700, and its key files 0600, even if made wider before
    return settings


def _prepare_store(settings: Settings) -> None:
    """Migrate the metadata DB and create the first admin key (printed once)."""
    from budrt.store.db import migrate
    from budrt.store.keys import ADMIN_KEY_FILE, KeyStore

    migrate(settings.database_url_resolved)
    try:
        admin = KeyStore.from_settings(settings).ensure_admin(settings)
    except ValueError as exc:  # a BUDRT_ADMIN_KEY no gateway would accept
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if admin is not None:
        typer.echo(f"admin key: {admin} (saved to {settings.home / ADMIN_KEY_FILE})")


@app.command()
def serve(host: Host = None, port: Port = None, home: Home = None, config: ConfigFile = None) -> None:
    """Start the gateway and the model servers behind it, under a supervisor."""
    from budrt.control.supervisor import Supervisor
    from budrt.observe.logging import setup_logging

    settings = _settings(config, home, host, port)
    setup_logging("supervisor", settings.log_level)
    _prepare_store(settings)
    raise typer.Exit(Supervisor(settings).run())


@app.command()
def gateway(host: Host = None, port: Port = None, home: Home = None, config: ConfigFile = None) -> None:
    """Run a gateway alone, in front of the upstreams named in the config's `deployments`."""
    from budrt.gateway.main import run_gateway

    settings = _settings(config, home, host, port)
    run_gateway(settings)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Show every process of the running platform: pid, port, state, models."""
    from budrt.control.status import platform_status

    settings = _settings(config, home)
    data = platform_status(settings.home)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"budrt at {settings.home} ({'running' if data['running'] else 'stopped'})")
        for column in ("name", "kind", "pid", "port", "state", "restarts", "models", "last error"):
            table.add_column(column)
        for p in data["processes"]:
            resident = {r["name"]: r for r in p.get("resident") or []}
            models = [
                f"{m} ({resident[m]['state']}, {int(resident[m].get('memory_bytes') or 0) >> 20} MiB)"
                if m in resident
                else m
                for m in p["models"]
            ]
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
        Console().print(table)
    raise typer.Exit(0 if data["running"] else 1)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A label for the key.")],
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated models it may use.")] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Give the key the admin role.")] = False,
    role: Annotated[str | None, typer.Option("--role", help="Role: developer (default), viewer...")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Owner; the key never exceeds them.")] = None,
    tokens_per_day: Annotated[
        int | None, typer.Option("--tokens-per-day", min=1, help="Token budget per UTC day.")
    ] = None,
    tokens_per_month: Annotated[
        int | None, typer.Option("--tokens-per-month", min=1, help="Token budget per calendar month.")
    ] = None,
    images_per_day: Annotated[
        int | None, typer.Option("--images-per-day", min=1, help="Images per UTC day.")
    ] = None,
    images_per_month: Annotated[
        int | None, typer.Option("--images-per-month", min=1, help="Images per calendar month.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Create an API key; the key is shown once."""
    from budrt.cli_identity import run
    from budrt.store.db import migrate
    from budrt.store.identity import IdentityStore
    from budrt.store.keys import KeyStore

    settings = _settings(config, home)
    migrate(settings.database_url_resolved)
    model_list = [m.strip() for m in models.split(",") if m.strip()] if models else None
    budgets = {
        "tokens_per_day": tokens_per_day,
        "tokens_per_month": tokens_per_month,
        "images_per_day": images_per_day,
        "images_per_month": images_per_month,
    }
    store = KeyStore.from_settings(settings)
    user_id = team_id = None
    run(IdentityStore(store.engine).check_roles, [role or "user"])
    if user is not None:
        user_id, team_id, _ = run(IdentityStore(store.engine).user, user)
    key, record = run(
        lambda: store.create(
            name,
            role=role or ("admin" if admin else "user"),  # "user": the developer role
            models=model_list,
            rpm=rpm,
            tpm=tpm,
            user_id=user_id,
            team_id=team_id,
            budgets={name: value for name, value in budgets.items() if value is not None},
        )
    )
    IdentityStore(store.engine).record("cli", "keys:create", f"key:{record.id}", {"role": record.role})
    if as_json:
        typer.echo(json.dumps({"key": key, **_record_json(record)}))
    else:
        typer.echo(key)
        typer.echo(f"(id {record.id}, prefix {record.prefix}; store it now: it is not shown again)", err=True)


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json")] = False, home: Home = None, config: ConfigFile = None
) -> None:
    """List keys (never their secret part)."""
    from budrt.store.db import migrate
    from budrt.store.keys import KeyStore

    settings = _settings(config, home)
    migrate(settings.database_url_resolved)
    records = [_record_json(r) for r in KeyStore.from_settings(settings).list()]
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    for r in records:
        state = "revoked" if r["revoked_at"] else "active"
        typer.echo(f"{r['id']:>4}  {r['prefix']:<14} {r['name']:<20} {r['role']:<6} {state}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Numeric id or visible prefix.")],
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Revoke a key; every gateway refuses it within a second."""
    from budrt.store.db import migrate
    from budrt.store.keys import KeyStore

    settings = _settings(config, home)
    migrate(settings.database_url_resolved)  # the audit log may be newer than this database
    try:
        record = KeyStore.from_settings(settings).revoke(key_id)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if record is None:
        typer.echo(f"error: no active key matches {key_id!r}", err=True)
        raise typer.Exit(1)
    from budrt.store.identity import IdentityStore

    IdentityStore(KeyStore.from_settings(settings).engine).record("cli", "keys:revoke", f"key:{record.id}")
    typer.echo(f"revoked key {record.id} ({record.prefix})")


@keys_app.command("set-limits")
def keys_set_limits(
    key_id: Annotated[int, typer.Argument(help="Numeric id of the key.")],
    rpm: Rpm = None,
    tpm: Tpm = None,
    tokens_per_day: TokensDay = None,
    tokens_per_month: TokensMonth = None,
    images_per_day: ImagesDay = None,
    images_per_month: ImagesMonth = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Set a key's limits (only the options given change; 0 removes one). Every gateway applies
    them within a second."""
    from budrt.cli_identity import limits, limits_line, run
    from budrt.store.db import migrate
    from budrt.store.identity import IdentityStore
    from budrt.store.keys import KeyStore

    settings = _settings(config, home)
    migrate(settings.database_url_resolved)
    quota = limits(
        rpm=rpm,
        tpm=tpm,
        tokens_per_day=tokens_per_day,
        tokens_per_month=tokens_per_month,
        images_per_day=images_per_day,
        images_per_month=images_per_month,
    )
    if not quota:
        typer.echo("error: give at least one limit option (see --help)", err=True)
        raise typer.Exit(2)
    store = KeyStore.from_settings(settings)
    record = run(store.update_limits, key_id, quota)
    if record is None:
        typer.echo(f"error: no active key with id {key_id}", err=True)
        raise typer.Exit(1)
    IdentityStore(store.engine).record("cli", "keys:update", f"key:{key_id}", quota)
    data = _record_json(record)
    typer.echo(json.dumps(data) if as_json else f"key {record.id}: {limits_line(data)}")


@config_app.command("show")
def config_show(home: Home = None, config: ConfigFile = None) -> None:
    """Print the effective configuration (secrets masked) as YAML."""
    import yaml

    settings = _settings(config, home)
    yaml.safe_dump(settings.masked(), sys.stdout, sort_keys=False)


def _record_json(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "role": record.role,
        "models": list(record.models) if record.models is not None else None,
        "rpm": record.rpm,
        "tpm": record.tpm,
        "tokens_per_day": record.tokens_per_day,
        "tokens_per_month": record.tokens_per_month,
        "images_per_day": record.images_per_day,
        "images_per_month": record.images_per_month,
        "created_at": record.created_at.isoformat() if record.created_at else None,
        "expires_at": record.expires_at.isoformat() if record.expires_at else None,
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
    }


if __name__ == "__main__":
    app()
