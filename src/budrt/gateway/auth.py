"""Bearer authentication (API keys and JWTs) with a short in-process cache, and authorization.

Both kinds of credential end as a `Principal` holding its resolved permissions, so a warm
request does no database work: keys are cached by HMAC digest for `ttl_s` (which is also how
long a revocation takes to reach this process), tokens by their text until `ttl_s` or `exp`.
Garbage cannot hurt that cache: a token not shaped like a key is refused without a lookup, and
unknown keys are remembered apart (bounded, least recently seen dropped first), so spraying
keys neither evicts valid ones nor costs a database read per repeat.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime

from prometheus_client import Counter
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import cookie_parser

from budrt.gateway.jwt_auth import JWTVerifier, looks_like_jwt
from budrt.gateway.ratelimit import Limit, quota_limit
from budrt.protocol.errors import APIError, database_unavailable, unauthorized
from budrt.security.keys import KEY_PREFIX, MAX_KEY_LEN, well_formed
from budrt.security.rbac import BUILTIN_ROLES, LEGACY_ROLES, PermissionSet, Principal, role_permissions
from budrt.store.database import is_unavailable
from budrt.store.identity import IdentityStore
from budrt.store.keys import KeyRecord, KeyStore
from budrt.store.quotas import Quota
from budrt.store.sessions import Session, SessionStore

_MAX_CACHED = 10_000  # valid principals; beyond it the longest-loaded (likely expired) goes
_MAX_MISSES = 10_000  # unknown keys remembered; beyond it the least recently seen goes
_CustomRoles = dict[str, tuple[str, ...]]
_STALE_LOG_EVERY_S = 10.0
SESSION_COOKIE = "budrt_session"  # the web console's sign-in (gateway/console)
CSRF_HEADER = "x-csrf-token"

log = logging.getLogger("budrt.gateway")
STALE = Counter(
    "budrt:auth_stale_total",
    "Requests authenticated from an expired cache entry while the metadata database was unavailable",
)


def extract_key(headers: Headers) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("api-key") or headers.get("x-api-key") or None


def forbidden(message: str) -> APIError:
    return APIError(403, message, code="permission_denied")


def require(principal: Principal, action: str, resource: str = "*") -> None:
    """403 unless `principal` may do `action` on `resource`; the message names only those."""
    if not principal.can(action, resource):
        what = f" on {resource}" if resource != "*" else ""
        raise forbidden(f"This {_kind(principal)} is not allowed to {action}{what}.")


def require_any(principal: Principal, action: str, resources: Sequence[str]) -> None:
    """403 unless `principal` may do `action` on one of an object's `resources` (its own name
    first, then its owner's and team's); the message names the first."""
    if not principal.can_any(action, resources):
        require(principal, action, resources[0])


def require_model(principal: Principal, action: str, model: str, *names: str) -> None:
    """403 unless `principal` may do the inference `action` on the model known as `names`."""
    if not principal.can_use_model(action, *names):
        verb = action.rpartition(":")[2]
        raise forbidden(f"This {_kind(principal)} is not allowed to use {verb} on model `{model}`.")


def _kind(principal: Principal) -> str:
    return "key" if principal.kind == "key" else "token"


def _needs_custom(roles: Iterable[str]) -> bool:
    return any(LEGACY_ROLES.get(r, r) not in BUILTIN_ROLES for r in roles)


class Authenticator:
    """Maps a presented key or token to a Principal; the DB is read at most once per key per `ttl_s`."""

    def __init__(
        self,
        store: KeyStore,
        ttl_s: float = 1.0,
        *,
        stale_window_s: float = 0.0,
        identity: IdentityStore | None = None,
        jwt: JWTVerifier | None = None,
        sessions: SessionStore | None = None,
    ) -> None:
        self.store = store
        self.sessions = sessions  # web-console sign-ins; None: cookies are not credentials
        self.identity = identity or IdentityStore(store.db)
        self.jwt = jwt
        self.ttl_s = ttl_s
        self.stale_window_s = stale_window_s  # past `ttl_s`, while the database is unavailable
        self._stale_logged = -float("inf")
        self._cache: dict[str, tuple[float, Principal]] = {}  # insertion order = load order
        self._misses: OrderedDict[str, float] = OrderedDict()  # digest -> until (monotonic)
        self._pending: dict[str, asyncio.Future[Principal | None]] = {}
        self._sets: dict[tuple[str, ...], PermissionSet] = {}  # shared: their memos warm up once
        self._custom: tuple[float, _CustomRoles] = (-float("inf"), {})
        self._sessions: dict[str, tuple[float, Session | None]] = {}  # cookie token -> (until, session)

    def invalidate(self) -> None:
        """Forget every cached principal (after a change made through this process)."""
        self._cache.clear()
        self._misses.clear()
        self._custom = (-float("inf"), {})
        self._sessions.clear()

    async def authenticate(self, headers: Headers) -> Principal:
        token = extract_key(headers)
        if not token:
            if self.sessions is not None and SESSION_COOKIE in headers.get("cookie", ""):
                return await self._session_principal(headers)
            raise unauthorized("Missing API key. Send it as 'Authorization: Bearer <key>'.")
        if self.jwt is not None and not token.startswith(KEY_PREFIX) and looks_like_jwt(token):
            principal = await self._cached(token, token, self._load_jwt)
            if principal is None:
                raise unauthorized("Invalid bearer token.")
            return principal
        if len(token) > MAX_KEY_LEN:
            raise unauthorized("Incorrect API key provided.")
        digest = self.store.hash(token)
        hit = self._cache.get(digest)  # the warm path, inlined: no coroutine calls
        if hit is not None and hit[0] > time.monotonic() and hit[1].expires_at is None:
            return hit[1]
        principal = await self.lookup(token, digest)
        if principal is None:
            raise unauthorized("Incorrect API key provided.")
        return principal

    async def session(self, token: str) -> Session | None:
        """The live console session of a cookie token, read at most once per `ttl_s`; it ends at
        its expiry even while cached."""
        now = time.monotonic()
        hit = self._sessions.get(token)
        if hit is not None and hit[0] > now:
            cached = hit[1]
            return cached if cached is None or cached.expires_at > datetime.now(UTC) else None
        assert self.sessions is not None
        session = await run_in_threadpool(self.sessions.get, token)
        if len(self._sessions) >= _MAX_CACHED:
            self._sessions.clear()
        self._sessions[token] = (now + self.ttl_s, session)
        return session

    def forget_session(self, token: str) -> None:
        self._sessions.pop(token, None)

    async def session_principal(self, session: Session) -> Principal | None:
        """Whoever signed in to `session`, as of now: None once the key is revoked or the
        token has expired."""
        if session.key_hash is not None:
            return await self._cached(session.key_hash, session.key_hash, self._load_key)
        if session.id_token is not None:
            return await self.token_principal(session.id_token)
        return None

    async def token_principal(self, token: str) -> Principal | None:
        """The principal of a JWT (an OIDC ID token), None when it is not (or no longer) valid."""
        if self.jwt is None:
            return None
        try:
            return await self._cached(token, token, self._load_jwt)
        except APIError as exc:
            if exc.status != 401:  # e.g. the database is unavailable: not the token's fault
                raise
            return None

    async def _session_principal(self, headers: Headers) -> Principal:
        """A console request: the session cookie plus its CSRF token in `x-csrf-token`, which a
        page of another site can neither read nor send without a CORS preflight."""
        token = cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE, "")
        session = await self.session(token) if token else None
        if session is None:
            raise unauthorized("The console session has ended; sign in again.")
        if not hmac.compare_digest(headers.get(CSRF_HEADER, ""), session.csrf):
            raise forbidden("Missing or wrong CSRF token (x-csrf-token).")
        principal = await self.session_principal(session)
        if principal is None:
            raise unauthorized("The console session's credential is no longer valid; sign in again.")
        return principal

    async def lookup(self, key: str, digest: str | None = None) -> Principal | None:
        """The key's principal; None for a malformed key (no database read), a recently seen
        unknown one (no read either) or one the database does not know (remembered)."""
        if not well_formed(key):
            return None
        digest = digest or self.store.hash(key)
        until = self._misses.get(digest)
        if until is not None:
            if until > time.monotonic():
                self._misses.move_to_end(digest)
                return None
            del self._misses[digest]
        return await self._cached(digest, digest, self._load_key)

    async def _cached(
        self, cache_key: str, secret: str, load: Callable[[str], Awaitable[Principal | None]]
    ) -> Principal | None:
        now = time.monotonic()
        hit = self._cache.get(cache_key)
        if hit is not None and hit[0] > now:
            principal = hit[1]
            # Expiry is checked on every hit so an expiring key stops at its exact time.
            if principal.expires_at is None:
                return principal
            return principal if principal.expires_at > datetime.now(UTC) else None
        pending = self._pending.get(cache_key)
        if pending is not None:  # concurrent misses for one key share one load
            return await asyncio.shield(pending)
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._pending[cache_key] = future
        try:
            try:
                principal = await load(secret)
                self._remember(cache_key, principal)
            except DBAPIError as exc:
                principal = self._stale(hit, exc)
            future.set_result(principal)
            return principal
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._pending[cache_key]

    def _stale(self, hit: tuple[float, Principal] | None, exc: DBAPIError) -> Principal | None:
        """With the database unavailable, the principal of an expired cache entry younger than
        the stale window (not remembered again: the window runs from the last real load);
        otherwise a 503, or the error itself when it is not about availability."""
        if not is_unavailable(exc):
            raise exc
        now = time.monotonic()
        if hit is None or now > hit[0] + self.stale_window_s:
            raise database_unavailable() from exc
        principal = hit[1]
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            return None
        STALE.inc()
        if now - self._stale_logged > _STALE_LOG_EVERY_S:
            self._stale_logged = now
            fields = {"error": str(exc), "window_s": self.stale_window_s}
            log.warning("database unavailable; serving keys from the stale cache", extra={"fields": fields})
        return principal

    def _remember(self, cache_key: str, principal: Principal | None) -> None:
        until = time.monotonic() + self.ttl_s
        if principal is None:
            self._misses[cache_key] = until
            self._misses.move_to_end(cache_key)
            if len(self._misses) > _MAX_MISSES:
                self._misses.popitem(last=False)
            return
        self._cache.pop(cache_key, None)  # re-inserted last: the dict's order is load order
        self._cache[cache_key] = (until, principal)
        if len(self._cache) > _MAX_CACHED:
            del self._cache[next(iter(self._cache))]

    async def warm_up(self) -> None:
        """Look up a key no one holds, at start, so that the first request does not pay for a
        first lookup (~25 ms: anyio imports its thread-pool backend at first use, the database
        opens its first connection and compiles the statement). Nothing is written; a database
        that is down is left to the requests, which say so."""
        try:
            await run_in_threadpool(self._read_key, "0" * 64)  # no HMAC digest is all zeros
        except Exception as exc:
            log.info("key lookup warm-up failed: %s", exc)

    async def _load_key(self, digest: str) -> Principal | None:
        found = await run_in_threadpool(self._read_key, digest)
        if found is None:
            return None
        record, owner = found
        roles = (record.role, *(owner.roles or ()))
        custom = await self._custom_roles() if _needs_custom(roles) else {}
        grants = [self._set(role_permissions([record.role], custom))]
        if owner.roles is not None:  # an owned key never exceeds its owner
            grants.append(self._set(role_permissions(owner.roles, custom)))
        if record.permissions is not None:
            grants.append(self._set(PermissionSet(record.permissions)))
        return Principal(
            kind="key",
            id=record.id,
            name=record.name,
            key_id=record.id,
            user=owner.user,
            team=owner.team,
            roles=(LEGACY_ROLES.get(record.role, record.role),),
            grants=tuple(grants),
            models=record.models,
            rpm=record.rpm,
            tpm=record.tpm,
            expires_at=record.expires_at,
            quotas=_quotas(
                f"key:{record.id}", record.quota, owner.user, owner.user_quota, owner.team, owner.team_quota
            ),
        )

    def _read_key(self, digest: str):  # type: ignore[no-untyped-def]
        record: KeyRecord | None = self.store.verify_digest(digest)
        if record is None:
            return None
        return record, self.identity.owner(record.user_id, record.team_id)

    async def _load_jwt(self, token: str) -> Principal | None:
        assert self.jwt is not None
        ident = await self.jwt.verify(token)  # raises a 401 saying what is wrong
        custom = await self._custom_roles() if _needs_custom(ident.roles) else {}
        user_quota, team_quota = await run_in_threadpool(self.identity.quotas, ident.user, ident.team)
        expires = datetime.fromtimestamp(ident.expires_at, UTC) if ident.expires_at is not None else None
        return Principal(
            kind="jwt",
            id=f"jwt:{ident.user}",
            name=ident.user,
            user=ident.user,
            team=ident.team,
            roles=ident.roles,
            grants=(self._set(role_permissions(ident.roles, custom)),),
            expires_at=expires,
            quotas=_quotas(None, None, ident.user, user_quota, ident.team, team_quota),
        )

    async def _custom_roles(self) -> _CustomRoles:
        expires, roles = self._custom
        if expires > time.monotonic():
            return roles
        roles = await run_in_threadpool(self.identity.custom_roles)
        self._custom = (time.monotonic() + self.ttl_s, roles)
        return roles

    def _set(self, perms: PermissionSet) -> PermissionSet:
        shared = self._sets.setdefault(perms.permissions, perms)
        if len(self._sets) > 1024:
            self._sets.clear()
        return shared


def _quotas(
    key: str | None,
    key_quota: Quota | None,
    user: str | None,
    user_quota: Quota | None,
    team: str | None,
    team_quota: Quota | None,
) -> tuple[Limit, ...]:
    """The stored limits of a principal's scopes, the key's first (its are the headers sent)."""
    scopes = (
        (key, key_quota),
        (f"user:{user}" if user else None, user_quota),
        (f"team:{team}" if team else None, team_quota),
    )
    found = (quota_limit(scope, quota) for scope, quota in scopes if scope)
    return tuple(lim for lim in found if lim is not None)
