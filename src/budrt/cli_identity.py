"""`budrt users|teams|roles ...`: identity management from the command line.

Each change is audited with actor `cli`. The gateway picks changes up within its cache TTL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

users_app = typer.Typer(help="Manage users.", no_args_is_help=True)
teams_app = typer.Typer(help="Manage teams.", no_args_is_help=True)
roles_app = typer.Typer(help="Manage roles (built-in: admin, developer, viewer).", no_args_is_help=True)

Home = Annotated[Path | None, typer.Option("--home", help="Data directory (same as BUDRT_HOME).")]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML configuration file.", exists=True, dir_okay=False)
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ACTOR = "cli"


def _limit(flag: str, what: str) -> Any:
    return Annotated[int | None, typer.Option(flag, min=0, help=f"{what}; 0 = unlimited.")]


# Limits shared by every key of a user or team (a JWT naming them gets theirs too).
Rpm = _limit("--rpm", "Requests per minute")
Tpm = _limit("--tpm", "Tokens per minute")
TokensDay = _limit("--tokens-per-day", "Token budget per UTC day")
TokensMonth = _limit("--tokens-per-month", "Token budget per calendar month (UTC)")
ImagesDay = _limit("--images-per-day", "Images per UTC day")
ImagesMonth = _limit("--images-per-month", "Images per calendar month (UTC)")


def limits(**given: int | None) -> dict[str, int | None]:
    """The limit options that were given; 0 becomes None (unlimited)."""
    return {name: (value or None) for name, value in given.items() if value is not None}


def limits_line(data: dict[str, Any]) -> str:
    from budrt.store.quotas import QUOTA_FIELDS

    set_ = [f"{name}={data[name]}" for name in QUOTA_FIELDS if data.get(name)]
    return " ".join(set_) or "no limits"


def identity_store(config: Path | None, home: Path | None) -> Any:
    from budrt.cli import _settings
    from budrt.store.db import make_engine, migrate
    from budrt.store.identity import IdentityStore

    settings = _settings(config, home)
    migrate(settings.database_url_resolved)
    return IdentityStore(make_engine(settings.database_url_resolved))


def split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def run(fn: Any, *args: Any) -> Any:
    """Call a store method; a name conflict or unknown reference is the user's to fix."""
    from budrt.store.identity import Conflict, NotFound

    try:
        return fn(*args)
    except (Conflict, NotFound, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def show(data: Any, as_json: bool, line: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else line)


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Option("--name", help="User name (what a JWT's user claim holds).")],
    team: Annotated[str | None, typer.Option("--team", help="Team the user belongs to.")] = None,
    roles: Annotated[str | None, typer.Option("--roles", help="Comma-separated roles.")] = "developer",
    rpm: Rpm = None,
    tpm: Tpm = None,
    tokens_per_day: TokensDay = None,
    tokens_per_month: TokensMonth = None,
    images_per_day: ImagesDay = None,
    images_per_month: ImagesMonth = None,
    as_json: AsJson = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Create a user."""
    store = identity_store(config, home)
    quota = limits(
        rpm=rpm,
        tpm=tpm,
        tokens_per_day=tokens_per_day,
        tokens_per_month=tokens_per_month,
        images_per_day=images_per_day,
        images_per_month=images_per_month,
    )
    user = run(store.create_user, name, team, split(roles), ACTOR, quota)
    show(user, as_json, f"created user {user['id']} {user['name']} roles={','.join(user['roles'])}")


@users_app.command("set-limits")
def users_set_limits(
    name: Annotated[str, typer.Argument(help="User name.")],
    rpm: Rpm = None,
    tpm: Tpm = None,
    tokens_per_day: TokensDay = None,
    tokens_per_month: TokensMonth = None,
    images_per_day: ImagesDay = None,
    images_per_month: ImagesMonth = None,
    as_json: AsJson = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Set a user's limits (only the options given change; 0 removes one)."""
    quota = limits(
        rpm=rpm,
        tpm=tpm,
        tokens_per_day=tokens_per_day,
        tokens_per_month=tokens_per_month,
        images_per_day=images_per_day,
        images_per_month=images_per_month,
    )
    user = run(identity_store(config, home).update_user, name, quota, ACTOR)
    show(user, as_json, f"user {user['name']}: {limits_line(user)}")


@users_app.command("list")
def users_list(as_json: AsJson = False, home: Home = None, config: ConfigFile = None) -> None:
    """List users."""
    users = identity_store(config, home).list_users()
    show(
        users,
        as_json,
        "\n".join(
            f"{u['id']:>4}  {u['name']:<20} {u['team'] or '-':<14} {','.join(u['roles'])}" for u in users
        ),
    )


@users_app.command("set-roles")
def users_set_roles(
    name: Annotated[str, typer.Argument(help="User name.")],
    roles: Annotated[str, typer.Option("--roles", help="Comma-separated roles (replaces the current).")],
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Replace a user's roles."""
    store = identity_store(config, home)
    user = run(store.set_roles, name, split(roles), ACTOR)
    typer.echo(f"user {user['name']} roles={','.join(user['roles'])}")


@teams_app.command("create")
def teams_create(
    name: Annotated[str, typer.Option("--name", help="Team name.")],
    rpm: Rpm = None,
    tpm: Tpm = None,
    tokens_per_day: TokensDay = None,
    tokens_per_month: TokensMonth = None,
    images_per_day: ImagesDay = None,
    images_per_month: ImagesMonth = None,
    as_json: AsJson = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Create a team."""
    quota = limits(
        rpm=rpm,
        tpm=tpm,
        tokens_per_day=tokens_per_day,
        tokens_per_month=tokens_per_month,
        images_per_day=images_per_day,
        images_per_month=images_per_month,
    )
    team = run(identity_store(config, home).create_team, name, ACTOR, quota)
    show(team, as_json, f"created team {team['id']} {team['name']}")


@teams_app.command("set-limits")
def teams_set_limits(
    name: Annotated[str, typer.Argument(help="Team name.")],
    rpm: Rpm = None,
    tpm: Tpm = None,
    tokens_per_day: TokensDay = None,
    tokens_per_month: TokensMonth = None,
    images_per_day: ImagesDay = None,
    images_per_month: ImagesMonth = None,
    as_json: AsJson = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Set a team's limits, shared by all its users and keys (0 removes one)."""
    quota = limits(
        rpm=rpm,
        tpm=tpm,
        tokens_per_day=tokens_per_day,
        tokens_per_month=tokens_per_month,
        images_per_day=images_per_day,
        images_per_month=images_per_month,
    )
    team = run(identity_store(config, home).update_team, name, quota, ACTOR)
    show(team, as_json, f"team {team['name']}: {limits_line(team)}")


@teams_app.command("list")
def teams_list(as_json: AsJson = False, home: Home = None, config: ConfigFile = None) -> None:
    """List teams."""
    teams = identity_store(config, home).list_teams()
    show(teams, as_json, "\n".join(f"{t['id']:>4}  {t['name']}" for t in teams))


@roles_app.command("create")
def roles_create(
    name: Annotated[str, typer.Option("--name", help="Role name.")],
    permission: Annotated[
        list[str], typer.Option("--permission", "-p", help="action@resource, e.g. inference:chat@model:a-*")
    ],
    as_json: AsJson = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Create a custom role from permissions (`action@resource`, wildcards allowed)."""
    role = run(identity_store(config, home).create_role, name, permission, ACTOR)
    show(role, as_json, f"created role {role['name']}: {' '.join(role['permissions'])}")


@roles_app.command("list")
def roles_list(as_json: AsJson = False, home: Home = None, config: ConfigFile = None) -> None:
    """List built-in and custom roles with their permissions."""
    roles = identity_store(config, home).list_roles()
    show(roles, as_json, "\n".join(f"{r['name']:<16} {' '.join(r['permissions'])}" for r in roles))
