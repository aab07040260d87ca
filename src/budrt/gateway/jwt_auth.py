"""JWT bearer tokens: HS256 with a shared secret, RS256/ES256 with keys from a JWKS URL.

The JWKS is fetched with aiohttp, cached for `jwks_cache_s`, and refetched when a token names
an unknown `kid` (a provider rotated its keys), at most once per `jwks_min_refresh_s` so that
tokens with made-up `kid`s cannot make the gateway hammer the provider.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from budrt.config import JWTConfig
from budrt.gateway.params import valid_name
from budrt.protocol.errors import unauthorized

log = logging.getLogger("budrt.gateway.jwt")

_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
_JWKS_TIMEOUT = aiohttp.ClientTimeout(total=5)


def looks_like_jwt(token: str) -> bool:
    """Cheap test: a JWS compact serialisation starts with a base64url '{"' and has two dots."""
    return token.startswith("eyJ") and token.count(".") == 2


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    team: str | None
    roles: tuple[str, ...]
    expires_at: float | None  # unix time


def claim(claims: dict[str, Any], path: str | None) -> Any:
    """A claim by dotted path (`realm_access.roles`); None when absent."""
    if not path:
        return None
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class JWKSCache:
    """Signing keys by `kid`, fetched from a JWKS URL."""

    def __init__(self, url: str, cache_s: float, min_refresh_s: float) -> None:
        self.url = url
        self.cache_s = cache_s
        self.min_refresh_s = min_refresh_s
        self.fetches = 0
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -float("inf")
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def get(self, kid: str | None) -> jwt.PyJWK | None:
        age = time.monotonic() - self._fetched_at
        stale = age > self.cache_s
        unknown = kid not in self._keys and age > self.min_refresh_s
        if stale or unknown or self._lock.locked():  # locked: a fetch is under way, wait for it
            async with self._lock:
                age = time.monotonic() - self._fetched_at
                if age > self.cache_s or (kid not in self._keys and age > self.min_refresh_s):
                    await self._fetch()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    async def _fetch(self) -> None:
        self._fetched_at = time.monotonic()  # also on failure: the refresh rate limit holds
        self.fetches += 1
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_JWKS_TIMEOUT)
        try:
            async with self._session.get(self.url) as resp:
                resp.raise_for_status()
                data = await resp.json(content_type=None)
            keys: dict[str, jwt.PyJWK] = {}
            for entry in data.get("keys", []):
                if entry.get("use", "sig") != "sig":
                    continue
                try:
                    key = jwt.PyJWK.from_dict(entry)
                except jwt.PyJWTError:
                    continue  # an algorithm we do not support; others may still be usable
                keys[entry.get("kid") or ""] = key
            self._keys = keys
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            # Keep the keys we had: a provider hiccup must not log everyone out.
            log.warning("JWKS fetch failed", extra={"fields": {"url": self.url, "error": repr(exc)}})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class JWTVerifier:
    def __init__(self, config: JWTConfig) -> None:
        self.config = config
        self.algorithms = frozenset(config.algorithms)
        self.jwks = (
            JWKSCache(config.jwks_url, config.jwks_cache_s, config.jwks_min_refresh_s)
            if config.jwks_url
            else None
        )

    async def verify(self, token: str) -> Identity:
        """The token's identity, or a 401 that says what kind of problem, never why in detail."""
        cfg = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthorized("Invalid bearer token.") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise unauthorized("Invalid bearer token.")
        # The key type follows the algorithm family, never the token's choice of key: an RS256
        # public key can never be used as an HS256 secret.
        key: Any
        if alg in _HMAC_ALGS:
            if cfg.secret is None:
                raise unauthorized("Invalid bearer token.")
            key = cfg.secret.get_secret_value()
        else:
            jwk = await self.jwks.get(header.get("kid")) if self.jwks else None
            if jwk is None or jwk.algorithm_name not in (alg, None):
                raise unauthorized("Invalid bearer token: unknown signing key.")
            key = jwk.key
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=cfg.leeway_s,
                options={
                    "require": ["exp"],
                    "verify_aud": cfg.audience is not None,
                    "verify_iss": cfg.issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise unauthorized("The bearer token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise unauthorized("The bearer token is not valid yet.") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise unauthorized("The bearer token was not issued for this service.") from None
        except jwt.PyJWTError:
            raise unauthorized("Invalid bearer token.") from None
        return self.identity(claims)

    def identity(self, claims: dict[str, Any]) -> Identity:
        cfg = self.config
        user = claim(claims, cfg.user_claim)
        if not isinstance(user, str | int) or user == "":
            raise unauthorized("The bearer token names no user.")
        if not valid_name(str(user)):  # it is stored with every usage record, as a name
            raise unauthorized("The bearer token's user is not a valid name.")
        team = claim(claims, cfg.team_claim)
        if isinstance(team, str | int) and not valid_name(str(team)):
            team = None  # a team no name could be: no team's rights, no team's usage
        roles = claim(claims, cfg.roles_claim)
        if isinstance(roles, str):
            roles = roles.split()  # OAuth-style space-separated scope string
        if not isinstance(roles, list):
            roles = cfg.default_roles
        exp = claims.get("exp")
        return Identity(
            user=str(user),
            team=str(team) if isinstance(team, str | int) else None,
            roles=tuple(str(r) for r in roles if isinstance(r, str)),
            expires_at=float(exp) if isinstance(exp, int | float) else None,
        )

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()
