"""`budrt keys create|list|revoke|set-limits`: API keys. Each change is audited with actor `cli`;
every gateway applies it within its auth cache TTL (a second by default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from budrt.cli.common import ACTOR, AsJson, ConfigFile, Home, fail, key_store, run, split
from budrt.cli.limits import ImagesDay, ImagesMonth, Rpm, TokensDay, TokensMonth, Tpm, add_set_limits, limits

if TYPE_CHECKING:
    from budrt.store.keys import KeyStore

keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)


def _audit(store: KeyStore, action: str, key_id: int, detail: dict[str, Any] | None = None) -> None:
    from budrt.store.identity import IdentityStore

    IdentityStore(store.db).record(ACTOR, action, f"key:{key_id}", detail)


def _owner(store: KeyStore, role: str | None, user: str | None) -> tuple[int | None, int | None]:
    """(user id, team id) of the key's owner, after checking its role exists; exits 2 if not."""
    from budrt.store.identity import IdentityStore

    identity = IdentityStore(store.db)
    run(identity.check_roles, [role or "user"])
    if user is None:
        return None, None
    user_id, team_id, _ = run(identity.user, user)
    return user_id, team_id


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="A label for the key.")],
    models: Annotated[str | None, typer.Option("--models", help="Comma-separated models it may use.")] = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    admin: Annotated[bool, typer.Option("--admin", help="Give the key the admin role.")] = False,
    role: Annotated[str | None, typer.Option("--role", help="Role: developer (default), viewer...")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Owner; the key never exceeds them.")] = None,
    tokens_per_day: TokensDay = None,
    tokens_per_month: TokensMonth = None,
    images_per_day: ImagesDay = None,
    images_per_month: ImagesMonth = None,
    as_json: AsJson = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Create an API key; the key is shown once."""
    store = key_store(config, home)
    budgets = limits(None, None, tokens_per_day, tokens_per_month, images_per_day, images_per_month)
    user_id, team_id = _owner(store, role, user)
    key, record = run(
        lambda: store.create(
            name,
            role=role or ("admin" if admin else "user"),  # "user": the developer role
            models=split(models) if models else None,  # "," allows none: []
            rpm=rpm,  # rates are arguments of their own; the rest of the quota is `budgets`
            tpm=tpm,
            user_id=user_id,
            team_id=team_id,
            budgets=budgets,
        )
    )
    _audit(store, "keys:create", record.id, {"role": record.role})
    if as_json:
        typer.echo(json.dumps({"key": key, **record.to_json()}))  # one line: `| jq -r .key`
    else:
        typer.echo(key)
        typer.echo(f"(id {record.id}, prefix {record.prefix}; store it now: it is not shown again)", err=True)


@keys_app.command("list")
def keys_list(as_json: AsJson = False, home: Home = None, config: ConfigFile = None) -> None:
    """List keys (never their secret part)."""
    records = [r.to_json() for r in key_store(config, home).list()]
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
    store = key_store(config, home)
    record = run(store.revoke, key_id)
    if record is None:
        fail(f"no active key matches {key_id!r}", 1)
    _audit(store, "keys:revoke", record.id)
    typer.echo(f"revoked key {record.id} ({record.prefix})")


def _update_key(
    config: Path | None, home: Path | None, key_id: int, quota: dict[str, int | None]
) -> dict[str, Any]:
    store = key_store(config, home)
    record = run(store.update_limits, key_id, quota)
    if record is None:
        fail(f"no active key with id {key_id}", 1)
    _audit(store, "keys:update", key_id, quota)
    return record.to_json()


add_set_limits(
    keys_app,
    "key",
    Annotated[int, typer.Argument(metavar="key_id", help="Numeric id of the key.")],
    "Set a key's limits (only the options given change; 0 removes one). Every gateway applies them"
    " within a second.",
    _update_key,
)
