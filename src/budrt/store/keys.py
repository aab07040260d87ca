"""API keys in the metadata database. Only HMAC hashes are stored; plaintext is shown once."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from budrt.config import Settings
from budrt.security.keys import (
    KEY_SHAPE,
    generate_api_key,
    hash_api_key,
    key_prefix,
    load_or_create_secret,
    well_formed,
)
from budrt.security.rbac import ROLE_NAME
from budrt.store.database import Database
from budrt.store.quotas import BUDGET_FIELDS, INT64_MAX, Quota, check_quota, quota_of
from budrt.store.tables import ApiKey

Role = str  # "admin", "user" (= developer, the default), or any built-in or custom role name
log = logging.getLogger("budrt.store")
ADMIN_KEY_FILE = "admin.key"
# A DB write per request would serialise the hot path on SQLite; a coarse timestamp is enough.
_TOUCH_EVERY = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    name: str
    prefix: str
    role: str
    models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    user_id: int | None = None  # owner: the key can do at most what this user can
    team_id: int | None = None
    permissions: tuple[str, ...] | None = None  # a subset of the role's; None = all of them
    tokens_per_day: int | None = None  # budgets per calendar period (UTC); None = unlimited
    tokens_per_month: int | None = None
    images_per_day: int | None = None
    images_per_month: int | None = None

    @property
    def quota(self) -> Quota:
        return quota_of(self)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def allows(self, *names: str) -> bool:
        """True when the key may use a model known by any of `names` (canonical name, alias)."""
        return self.models is None or any(n in self.models for n in names)

    def is_active(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def to_json(self) -> dict[str, Any]:
        """The key as the admin API and `budrt keys ... --json` show it (no hash, no plaintext)."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "role": self.role,
            "user_id": self.user_id,
            "team_id": self.team_id,
            "models": list(self.models) if self.models is not None else None,
            "permissions": list(self.permissions) if self.permissions is not None else None,
            **self.quota.as_dict(),  # rpm, tpm, then the budgets: QUOTA_FIELDS order
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "last_used_at": _iso(self.last_used_at),
        }


class KeyStore:
    def __init__(self, db: Database, secret: bytes) -> None:
        self.db = db
        self._secret = secret

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        return cls(Database.from_settings(settings), load_or_create_secret(settings))

    def hash(self, plaintext: str) -> str:
        return hash_api_key(plaintext, self._secret)

    def create(
        self,
        name: str,
        role: Role = "user",
        models: Sequence[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        expires_at: datetime | None = None,
        *,
        plaintext: str | None = None,
        user_id: int | None = None,
        team_id: int | None = None,
        permissions: Sequence[str] | None = None,
        budgets: dict[str, int | None] | None = None,
    ) -> tuple[str, KeyRecord]:
        """Create a key; returns the plaintext (shown once) and its record.

        `budgets`: any of tokens_per_day, tokens_per_month, images_per_day, images_per_month.
        """
        if not ROLE_NAME.match(role):
            raise ValueError(f"invalid role {role!r}")
        unknown = set(budgets or ()) - set(BUDGET_FIELDS)
        if unknown:
            raise ValueError(f"unknown budget {sorted(unknown)[0]!r}")
        check_quota({"rpm": rpm, "tpm": tpm, **(budgets or {})})  # what the columns hold
        key = plaintext or generate_api_key()
        row = ApiKey(
            name=name,
            prefix=key_prefix(key),
            key_hash=self.hash(key),
            role=role,
            models=list(models) if models is not None else None,
            rpm=rpm,
            tpm=tpm,
            created_at=datetime.now(UTC),
            expires_at=_aware(expires_at),
            user_id=user_id,
            team_id=team_id,
            permissions=list(permissions) if permissions is not None else None,
            **(budgets or {}),
        )
        with self.db.writes.begin() as session:
            session.add(row)
        return key, _record(row)

    def verify(self, plaintext: str) -> KeyRecord | None:
        """The active key matching `plaintext`, or None (unknown, revoked or expired)."""
        return self.verify_digest(self.hash(plaintext))

    def verify_digest(self, digest: str) -> KeyRecord | None:
        """The active key whose HMAC digest is `digest` (a console session keeps only that)."""
        now = datetime.now(UTC)
        record = self.db.read(lambda session: _by_hash(session, digest))
        if record is None and self.db.replicas:
            with self.db.session() as session:  # created since the replica last caught up?
                record = _by_hash(session, digest)
        if record is None or not record.is_active(now):
            return None
        if record.last_used_at is None or now - record.last_used_at > _TOUCH_EVERY:
            # A transaction of its own: upgrading the read above to a write fails at once on
            # SQLite when another process wrote meanwhile, whereas a fresh write waits its turn.
            try:
                with self.db.writes.begin() as session:
                    session.execute(update(ApiKey).where(ApiKey.id == record.id).values(last_used_at=now))
            except OperationalError as exc:  # a coarse timestamp must never fail authentication
                log.warning("last_used_at not updated", extra={"fields": {"error": str(exc)}})
        return record

    def get(self, key_id: int) -> KeyRecord | None:
        """The key with this id (revoked or not), or None."""
        if not 0 < key_id <= INT64_MAX:
            return None
        with self.db.session() as session:
            row = session.get(ApiKey, key_id)
            return _record(row) if row is not None else None

    def list(self) -> list[KeyRecord]:
        return self.db.read(
            lambda session: [_record(r) for r in session.scalars(select(ApiKey).order_by(ApiKey.id))]
        )

    def revoke(self, id_or_prefix: int | str) -> KeyRecord | None:
        """Revoke by numeric id or visible prefix; None if nothing matched.

        Raises ValueError when a prefix matches more than one active key.
        """
        with self.db.writes.begin() as session:
            query = select(ApiKey).where(ApiKey.revoked_at.is_(None))
            ident = str(id_or_prefix)
            if ident.isascii() and ident.isdigit():
                if len(ident) > 18:  # beyond any id the column holds
                    return None
                query = query.where(ApiKey.id == int(ident))
            else:
                query = query.where(ApiKey.prefix.startswith(ident, autoescape=True))
            rows = list(session.scalars(query))
            if not rows:
                return None
            if len(rows) > 1:
                raise ValueError(f"{ident!r} matches {len(rows)} keys; use the numeric id")
            rows[0].revoked_at = datetime.now(UTC)
            return _record(rows[0])

    def update_limits(self, key_id: int, quota: dict[str, int | None]) -> KeyRecord | None:
        """Set (a value) or clear (None) limits of an active key; None if there is no such key.
        Raises ValueError for an unknown field or a value that is not a positive integer."""
        values = check_quota(quota)
        if not 0 < key_id <= INT64_MAX:
            return None
        with self.db.writes.begin() as session:
            row = session.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                return None
            for field, value in values.items():
                setattr(row, field, value)
            return _record(row)

    def has_admin(self) -> bool:
        with self.db.session() as session:
            query = select(ApiKey.id).where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))
            return session.scalars(query.limit(1)).first() is not None

    def ensure_admin(self, settings: Settings) -> str | None:
        """Create the first admin key if none exists; returns its plaintext (print it once).

        The key is BUDRT_ADMIN_KEY when set, else generated; it is also written to
        `$home/admin.key` (mode 0600). Returns None when an admin key already exists.
        Raises ValueError when BUDRT_ADMIN_KEY is not shaped like a key: the gateway would
        refuse it without looking it up.
        """
        home = Path(settings.home)
        home.mkdir(parents=True, exist_ok=True)
        with _file_lock(home / ".admin.lock"):  # two processes starting at once make one admin
            if self.has_admin():
                return None
            given = settings.admin_key.get_secret_value() if settings.admin_key else None
            if given is not None and not well_formed(given):
                raise ValueError(f"BUDRT_ADMIN_KEY must match {KEY_SHAPE.pattern} (e.g. a key budrt printed)")
            try:
                key, _ = self.create("admin", role="admin", plaintext=given)
            except IntegrityError:
                return None  # the same BUDRT_ADMIN_KEY was stored by another process
            write_private_file(home / ADMIN_KEY_FILE, key + "\n")
            return key


def write_private_file(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # the file may have existed with wider permissions
        f.write(content)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite drops the time zone; every timestamp budrt writes is UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _by_hash(session: Session, digest: str) -> KeyRecord | None:
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
    return _record(row) if row is not None else None


def _record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        role=row.role,
        models=tuple(row.models) if row.models is not None else None,
        rpm=row.rpm,
        tpm=row.tpm,
        created_at=_aware(row.created_at),  # type: ignore[arg-type]
        expires_at=_aware(row.expires_at),
        revoked_at=_aware(row.revoked_at),
        last_used_at=_aware(row.last_used_at),
        user_id=row.user_id,
        team_id=row.team_id,
        permissions=tuple(row.permissions) if row.permissions is not None else None,
        **{name: getattr(row, name) for name in BUDGET_FIELDS},
    )
