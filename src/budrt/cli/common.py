"""What every `budrt` command shares: the `--home/--config/--json` options, the settings, the
stores, printing, and how a refusal reaches the user (`error: ...` on stderr, exit 1 or 2)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from budrt.security.files import secure_home

if TYPE_CHECKING:  # the stores import SQLAlchemy, the settings pydantic: loaded when used
    from budrt.config import Settings
    from budrt.store.identity import IdentityStore
    from budrt.store.keys import KeyStore
    from budrt.store.models import ModelStore

Home = Annotated[Path | None, typer.Option("--home", help="Data directory (same as BUDRT_HOME).")]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML configuration file.", exists=True, dir_okay=False)
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ACTOR = "cli"  # the actor the audit log records for a change made here


def load(
    config: Path | None,
    home: Path | None,
    host: str | None = None,
    port: int | None = None,
    tls: bool = False,
    log_format: str | None = None,
) -> Settings:
    """The settings tree, `--host/--port` (and `--tls`: `tls.enabled`, `--log-format`) over the
    config; a config error exits 2, no traceback."""
    from budrt.config import load_settings

    try:
        gateway = {"host": host, "port": port}
        tls_on = {"enabled": True if tls else None}
        settings = load_settings(config, home=home, gateway=gateway, tls=tls_on, log_format=log_format)
    except Exception as exc:  # a config error is the user's to fix: say what, no traceback
        fail(f"invalid configuration: {exc}", 2)
    os.environ["BUDRT_HOME"] = str(settings.home)
    secure_home(settings.home)  # 0700, and its key files 0600, even if made wider before
    return settings


def load_migrated(config: Path | None, home: Path | None) -> Settings:
    """The settings, with the metadata DB brought to the newest schema (the CLI may be newer)."""
    from budrt.store.db import migrate

    settings = load(config, home)
    migrate(settings.database_url_resolved)
    return settings


def key_store(config: Path | None, home: Path | None) -> KeyStore:
    from budrt.store.keys import KeyStore

    return KeyStore.from_settings(load_migrated(config, home))


def identity_store(config: Path | None, home: Path | None) -> IdentityStore:
    from budrt.store.database import Database
    from budrt.store.identity import IdentityStore

    return IdentityStore(Database.from_settings(load_migrated(config, home)))


def model_store(config: Path | None, home: Path | None) -> ModelStore:
    from budrt.store.models import ModelStore

    return ModelStore.from_settings(load_migrated(config, home))


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code) from None


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a store method; a name conflict, an unknown reference or a bad value exits 2."""
    from budrt.store.identity import Conflict, NotFound

    try:
        return fn(*args)
    except (Conflict, NotFound, ValueError) as exc:
        fail(str(exc), 2)


def show(data: Any, as_json: bool, line: str) -> None:
    """`data` as indented JSON with `--json`, else the one human-readable `line`."""
    typer.echo(json.dumps(data, indent=2) if as_json else line)


def split(value: str | None) -> list[str]:
    """A comma-separated option as a list; empty items dropped."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else []
