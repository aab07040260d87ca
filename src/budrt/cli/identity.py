"""`budrt users|teams|roles ...`: identity management. Each change is audited with actor `cli`;
the gateway picks it up within its auth cache TTL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from budrt.cli.common import ACTOR, AsJson, ConfigFile, Home, identity_store, run, show, split
from budrt.cli.limits import ImagesDay, ImagesMonth, Rpm, TokensDay, TokensMonth, Tpm, add_set_limits, limits

users_app = typer.Typer(help="Manage users.", no_args_is_help=True)
teams_app = typer.Typer(help="Manage teams.", no_args_is_help=True)
roles_app = typer.Typer(help="Manage roles (built-in: admin, developer, viewer).", no_args_is_help=True)


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
    quota = limits(rpm, tpm, tokens_per_day, tokens_per_month, images_per_day, images_per_month)
    user = run(identity_store(config, home).create_user, name, team, split(roles), ACTOR, quota)
    show(user, as_json, f"created user {user['id']} {user['name']} roles={','.join(user['roles'])}")


def _update_user(config: Path | None, home: Path | None, name: str, quota: dict[str, Any]) -> dict[str, Any]:
    return run(identity_store(config, home).update_user, name, quota, ACTOR)


add_set_limits(
    users_app,
    "user",
    Annotated[str, typer.Argument(metavar="name", help="User name.")],
    "Set a user's limits (only the options given change; 0 removes one).",
    _update_user,
)


@users_app.command("list")
def users_list(as_json: AsJson = False, home: Home = None, config: ConfigFile = None) -> None:
    """List users."""
    users = identity_store(config, home).list_users()
    lines = [f"{u['id']:>4}  {u['name']:<20} {u['team'] or '-':<14} {','.join(u['roles'])}" for u in users]
    show(users, as_json, "\n".join(lines))


@users_app.command("set-roles")
def users_set_roles(
    name: Annotated[str, typer.Argument(help="User name.")],
    roles: Annotated[str, typer.Option("--roles", help="Comma-separated roles (replaces the current).")],
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Replace a user's roles."""
    user = run(identity_store(config, home).set_roles, name, split(roles), ACTOR)
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
    quota = limits(rpm, tpm, tokens_per_day, tokens_per_month, images_per_day, images_per_month)
    team = run(identity_store(config, home).create_team, name, ACTOR, quota)
    show(team, as_json, f"created team {team['id']} {team['name']}")


def _update_team(config: Path | None, home: Path | None, name: str, quota: dict[str, Any]) -> dict[str, Any]:
    return run(identity_store(config, home).update_team, name, quota, ACTOR)


add_set_limits(
    teams_app,
    "team",
    Annotated[str, typer.Argument(metavar="name", help="Team name.")],
    "Set a team's limits, shared by all its users and keys (0 removes one).",
    _update_team,
)


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
