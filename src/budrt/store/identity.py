"""Users, teams, custom roles and the audit log in the metadata database.

Every admin change and its audit entry are written in one transaction, so the log never
misses a change that happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from budrt.security.rbac import BUILTIN_ROLES, LEGACY_ROLES, ROLE_NAME, PermissionSet
from budrt.store.database import Database
from budrt.store.quotas import Quota, check_quota, quota_of
from budrt.store.tables import AuditEntry, Role, Team, User


class Conflict(ValueError):
    """The name is taken."""


class NotFound(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class Owner:
    """What a key needs to know about its owner to build its permissions."""

    user: str | None
    team: str | None
    roles: tuple[str, ...] | None  # None: the key has no owning user
    user_quota: Quota | None = None  # limits every key of the user shares
    team_quota: Quota | None = None


@dataclass(frozen=True, slots=True)
class Member:
    """A user as an authorization check sees it."""

    id: int
    name: str
    team_id: int | None
    team: str | None
    roles: tuple[str, ...]


MemberCheck = Callable[[Member], None]  # raises to refuse; runs inside the change's transaction


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


class IdentityStore:
    """Authentication's reads and listings may come from a replica (`Database.read`); the
    lookups that precede an admin change read the primary."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reads used by authentication (one threadpool call per cache miss) --

    def owner(self, user_id: int | None, team_id: int | None) -> Owner:
        if user_id is None and team_id is None:
            return Owner(None, None, None)
        return self.db.read(lambda session: _owner(session, user_id, team_id))

    def quotas(self, user: str | None, team: str | None) -> tuple[Quota | None, Quota | None]:
        """The limits of a user and a team by name (a JWT names them); None where unknown."""

        def query(session: Session) -> tuple[Quota | None, Quota | None]:
            u = session.scalars(select(User).where(User.name == user)).first() if user else None
            t = session.scalars(select(Team).where(Team.name == team)).first() if team else None
            return (quota_of(u) if u else None), (quota_of(t) if t else None)

        return self.db.read(query)

    def custom_roles(self) -> dict[str, tuple[str, ...]]:
        return self.db.read(
            lambda session: {r.name: tuple(r.permissions) for r in session.scalars(select(Role))}
        )

    # -- admin operations --

    def create_team(self, name: str, actor: str, quota: dict[str, Any] | None = None) -> dict[str, Any]:
        limits = check_quota(quota or {})
        with self.db.writes.begin() as session:
            team = Team(name=name, created_at=_now(), **limits)
            session.add(team)
            _flush_unique(session, f"team {name!r} already exists")
            audit(session, actor, "teams:create", f"team:{name}", limits or None)
            return _team_json(team)

    def list_teams(self) -> list[dict[str, Any]]:
        return self.db.read(
            lambda session: [_team_json(t) for t in session.scalars(select(Team).order_by(Team.id))]
        )

    def update_team(self, name: str, quota: dict[str, Any], actor: str) -> dict[str, Any]:
        """Set (a value) or clear (None) the given limits of a team."""
        limits = check_quota(quota)
        with self.db.writes.begin() as session:
            team = self._team(session, name)
            for field, value in limits.items():
                setattr(team, field, value)
            audit(session, actor, "teams:update", f"team:{name}", limits)
            return _team_json(team)

    def create_user(
        self,
        name: str,
        team: str | None,
        roles: Sequence[str],
        actor: str,
        quota: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        limits = check_quota(quota or {})
        with self.db.writes.begin() as session:
            self._check_roles(session, roles)
            team_row = self._team(session, team) if team else None
            user = User(name=name, team_id=team_row.id if team_row else None, roles=list(roles), **limits)
            user.created_at = _now()
            session.add(user)
            _flush_unique(session, f"user {name!r} already exists")
            detail = {"team": team, "roles": list(roles), **limits}
            audit(session, actor, "users:create", f"user:{name}", detail)
            return _user_json(user, team)

    def update_user(
        self, name: str, quota: dict[str, Any], actor: str, check: MemberCheck | None = None
    ) -> dict[str, Any]:
        """Set (a value) or clear (None) the given limits of a user; `check` may refuse."""
        limits = check_quota(quota)
        with self.db.writes.begin() as session:
            user = self._user(session, name, check)
            for field, value in limits.items():
                setattr(user, field, value)
            audit(session, actor, "users:update", f"user:{name}", limits)
            team = session.get(Team, user.team_id) if user.team_id else None
            return _user_json(user, team.name if team else None)

    def list_users(self) -> list[dict[str, Any]]:
        def query(session: Session) -> list[dict[str, Any]]:
            teams = {t.id: t.name for t in session.scalars(select(Team))}
            users = session.scalars(select(User).order_by(User.id))
            return [_user_json(u, teams.get(u.team_id) if u.team_id else None) for u in users]

        return self.db.read(query)

    def member(self, name: str) -> Member:
        """A user with its team's name; raises NotFound."""
        with self.db.session() as session:
            return _member(session, self._user(session, name))

    def directory(self) -> tuple[dict[int, str], dict[int, str]]:
        """Names by id: (users, teams), to name the owners of many keys at once."""

        def query(session: Session) -> tuple[dict[int, str], dict[int, str]]:
            users = {u.id: u.name for u in session.scalars(select(User))}
            return users, {t.id: t.name for t in session.scalars(select(Team))}

        return self.db.read(query)

    def user(self, name: str) -> tuple[int, int | None, tuple[str, ...]]:
        """(id, team id, roles) of a user; raises NotFound."""
        with self.db.session() as session:
            user = self._user(session, name)
            return user.id, user.team_id, tuple(user.roles)

    def team_id(self, name: str) -> int:
        with self.db.session() as session:
            return self._team(session, name).id

    def set_roles(
        self, name: str, roles: Sequence[str], actor: str, check: MemberCheck | None = None
    ) -> dict[str, Any]:
        """Replace a user's roles; `check` sees the roles they replace (and may refuse)."""
        with self.db.writes.begin() as session:
            self._check_roles(session, roles)
            user = self._user(session, name, check)
            before = list(user.roles)
            user.roles = list(roles)
            audit(session, actor, "roles:assign", f"user:{name}", {"before": before, "after": list(roles)})
            team = session.get(Team, user.team_id) if user.team_id else None
            return _user_json(user, team.name if team else None)

    def create_role(self, name: str, permissions: Sequence[str], actor: str) -> dict[str, Any]:
        if name in BUILTIN_ROLES or name in LEGACY_ROLES:
            raise Conflict(f"role name {name!r} is reserved")
        if not ROLE_NAME.match(name):
            raise ValueError(f"invalid role name {name[:100]!r}: up to 64 of a-z, 0-9, '_.-'")
        perms = PermissionSet(permissions).strings()  # validates
        with self.db.writes.begin() as session:
            session.add(Role(name=name, permissions=perms, created_at=_now()))
            _flush_unique(session, f"role {name!r} already exists")
            audit(session, actor, "roles:create", f"role:{name}", {"permissions": perms})
        return {"name": name, "permissions": perms, "builtin": False}

    def list_roles(self) -> list[dict[str, Any]]:
        builtin = [{"name": n, "permissions": list(p), "builtin": True} for n, p in BUILTIN_ROLES.items()]
        roles = self.custom_roles().items()
        custom = [{"name": n, "permissions": list(p), "builtin": False} for n, p in roles]
        return builtin + custom

    def record(self, actor: str, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
        with self.db.writes.begin() as session:
            audit(session, actor, action, target, detail)

    def audit_log(
        self,
        limit: int = 100,
        *,
        contains: dict[str, str] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """The newest entries first; `contains` maps actor/action/target to a text the column
        must contain (case-insensitive, taken literally), within [start, end)."""
        columns = {"actor": AuditEntry.actor, "action": AuditEntry.action, "target": AuditEntry.target}
        filters = [columns[name].icontains(text, autoescape=True) for name, text in (contains or {}).items()]
        if start is not None:
            filters.append(AuditEntry.at >= start)
        if end is not None:
            filters.append(AuditEntry.at < end)
        newest = select(AuditEntry).where(*filters).order_by(AuditEntry.id.desc()).limit(limit)

        def query(session: Session) -> list[dict[str, Any]]:
            rows = session.scalars(newest)
            return [
                {
                    "id": r.id,
                    "at": _iso(r.at),
                    "actor": r.actor,
                    "action": r.action,
                    "target": r.target,
                    "detail": r.detail,
                }
                for r in rows
            ]

        return self.db.read(query)

    def check_roles(self, roles: Sequence[str]) -> None:
        """Raises NotFound unless every role is built in, legacy ("user") or custom."""
        with self.db.session() as session:
            self._check_roles(session, [r for r in roles if r not in LEGACY_ROLES])

    def _user(self, session: Session, name: str, check: MemberCheck | None = None) -> User:
        user = session.scalars(select(User).where(User.name == name)).first()
        if user is None:
            raise NotFound(f"user {name!r} does not exist")
        if check is not None:
            check(_member(session, user))
        return user

    def _team(self, session: Session, name: str) -> Team:
        team = session.scalars(select(Team).where(Team.name == name)).first()
        if team is None:
            raise NotFound(f"team {name!r} does not exist")
        return team

    def _check_roles(self, session: Session, roles: Sequence[str]) -> None:
        custom = set(session.scalars(select(Role.name)))
        for role in roles:
            if role not in BUILTIN_ROLES and role not in custom:
                raise NotFound(f"role {role!r} does not exist")


def _owner(session: Session, user_id: int | None, team_id: int | None) -> Owner:
    user = session.get(User, user_id) if user_id is not None else None
    team_id = team_id if team_id is not None else (user.team_id if user else None)
    team = session.get(Team, team_id) if team_id is not None else None
    if user_id is not None and user is None:
        return Owner(None, team.name if team else None, ())  # owner deleted: grants nothing
    return Owner(
        user.name if user else None,
        team.name if team else None,
        tuple(user.roles) if user else None,
        quota_of(user) if user else None,
        quota_of(team) if team else None,
    )


def audit(
    session: Session, actor: str, action: str, target: str, detail: dict[str, Any] | None = None
) -> None:
    session.add(AuditEntry(at=_now(), actor=actor, action=action, target=target, detail=detail))


def _flush_unique(session: Session, message: str) -> None:
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(message) from None


def _member(session: Session, user: User) -> Member:
    team = session.get(Team, user.team_id) if user.team_id is not None else None
    return Member(user.id, user.name, user.team_id, team.name if team else None, tuple(user.roles))


def _user_json(user: User, team: str | None) -> dict[str, Any]:
    return {
        "id": user.id,
        "name": user.name,
        "team": team,
        "roles": list(user.roles),
        "created_at": _iso(user.created_at),
        **quota_of(user).as_dict(),
    }


def _team_json(team: Team) -> dict[str, Any]:
    return {"id": team.id, "name": team.name, "created_at": _iso(team.created_at), **quota_of(team).as_dict()}
