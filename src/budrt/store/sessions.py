"""Web-console sessions: a random cookie token, stored only as its SHA-256, with a CSRF token.

A session remembers how its browser signed in (the API key's HMAC digest, or the OIDC ID token)
and nothing else: every request re-derives the principal from that credential, so revoking the
key or the token's expiry ends the session too. Rows live in the metadata database so that any
gateway replica can serve any browser.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from budrt.store.database import Database, as_utc
from budrt.store.tables import ConsoleSession


@dataclass(frozen=True, slots=True)
class Session:
    csrf: str
    key_hash: str | None
    id_token: str | None
    subject: str
    expires_at: datetime


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self, subject: str, ttl_s: float, *, key_hash: str | None = None, id_token: str | None = None
    ) -> tuple[str, Session]:
        """A new session's cookie token and the session; expired rows are purged on the way."""
        token, now = secrets.token_urlsafe(32), datetime.now(UTC)
        row = ConsoleSession(
            id=_digest(token),
            csrf=secrets.token_urlsafe(32),
            key_hash=key_hash,
            id_token=id_token,
            subject=subject,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )
        with self.db.writes.begin() as session:
            session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
            session.add(row)
        return token, _session(row)

    def get(self, token: str) -> Session | None:
        """The live session of a cookie token (on the primary: a new one must work at once)."""
        with self.db.session() as session:
            row = session.scalar(select(ConsoleSession).where(ConsoleSession.id == _digest(token)))
            if row is None or as_utc(row.expires_at) <= datetime.now(UTC):
                return None
            return _session(row)

    def delete(self, token: str) -> None:
        with self.db.writes.begin() as session:
            session.execute(delete(ConsoleSession).where(ConsoleSession.id == _digest(token)))


def _session(row: ConsoleSession) -> Session:
    return Session(
        csrf=row.csrf,
        key_hash=row.key_hash,
        id_token=row.id_token,
        subject=row.subject,
        expires_at=as_utc(row.expires_at),
    )
