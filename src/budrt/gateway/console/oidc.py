"""Console sign-in with an OpenID Connect provider: authorization code flow with PKCE (RFC 7636).

`start` sends the browser to the provider with a fresh state, nonce and S256 code challenge, kept
in a short-lived HttpOnly cookie of this site; `finish` checks the state, trades the code and the
verifier for tokens at the provider's token endpoint and checks the nonce. The ID token is then
verified like any bearer JWT (auth.jwt: signature from the provider's JWKS, issuer, audience),
and the session keeps it: the session ends when the token expires.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import orjson

from budrt.config import OIDCConfig, reveal

DISCOVERY_TTL_S = 3600.0
TIMEOUT_S = 10.0


class SignInFailed(Exception):
    """A sign-in that cannot go on; the message is shown on the sign-in page."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def code_challenge(verifier: str) -> str:
    return _b64(hashlib.sha256(verifier.encode()).digest())


class OIDCSignIn:
    COOKIE = "budrt_oidc"

    def __init__(self, config: OIDCConfig) -> None:
        self.config = config
        self.client = httpx.AsyncClient(timeout=TIMEOUT_S)
        self._metadata: tuple[float, dict[str, Any]] = (-float("inf"), {})

    async def start(self, redirect_uri: str) -> tuple[str, str]:
        """(the provider's authorization URL, the value of the pending-sign-in cookie)."""
        meta = await self.metadata()
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge(verifier),
            "code_challenge_method": "S256",
        }
        pending = _b64(orjson.dumps({"state": state, "nonce": nonce, "verifier": verifier}))
        return f"{meta['authorization_endpoint']}?{urlencode(params)}", pending

    async def finish(self, query: Mapping[str, str], pending_cookie: str, redirect_uri: str) -> str:
        """The ID token of a completed sign-in (not yet verified: the caller does that)."""
        pending = _pending(pending_cookie)
        if "error" in query:
            detail = query.get("error_description") or query["error"]
            raise SignInFailed(f"The identity provider refused the sign-in: {detail[:200]}")
        if not hmac.compare_digest(query.get("state", ""), pending["state"]):
            raise SignInFailed("The sign-in's state does not match; start again.")
        code = query.get("code")
        if not code:
            raise SignInFailed("The identity provider sent no authorization code.")
        tokens = await self._exchange(code, pending["verifier"], redirect_uri)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise SignInFailed("The identity provider returned no ID token.")
        try:  # the signature, issuer and audience are checked next, as for any bearer JWT
            claims = jwt.decode(id_token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise SignInFailed("The identity provider returned a malformed ID token.") from exc
        if not hmac.compare_digest(str(claims.get("nonce", "")), pending["nonce"]):
            raise SignInFailed("The ID token's nonce does not match this sign-in.")
        return id_token

    async def metadata(self) -> dict[str, Any]:
        """The provider's discovery document, fetched at most once per DISCOVERY_TTL_S."""
        until, meta = self._metadata
        if until > time.monotonic():
            return meta
        issuer = str(self.config.issuer).rstrip("/")
        try:
            response = await self.client.get(f"{issuer}/.well-known/openid-configuration")
            response.raise_for_status()
            meta = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SignInFailed(f"The identity provider could not be reached ({type(exc).__name__}).") from exc
        if str(meta.get("issuer", "")).rstrip("/") != issuer or "token_endpoint" not in meta:
            raise SignInFailed("The identity provider's discovery document does not match its issuer.")
        self._metadata = (time.monotonic() + DISCOVERY_TTL_S, meta)
        return meta

    async def _exchange(self, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        meta = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": str(self.config.client_id),
            "code_verifier": verifier,
        }
        secret = reveal(self.config.client_secret)
        if secret:
            form["client_secret"] = secret
        try:
            response = await self.client.post(meta["token_endpoint"], data=form)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise SignInFailed(
                f"The identity provider's token endpoint failed ({type(exc).__name__})."
            ) from exc
        if response.status_code != 200 or not isinstance(body, dict):
            detail = (
                body.get("error", response.status_code) if isinstance(body, dict) else response.status_code
            )
            raise SignInFailed(f"The identity provider refused the code ({detail}).")
        return body

    async def close(self) -> None:
        await self.client.aclose()


def _pending(cookie: str) -> dict[str, str]:
    try:
        pending = orjson.loads(base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4)))
        if not all(isinstance(pending.get(k), str) for k in ("state", "nonce", "verifier")):
            raise ValueError("incomplete")
    except (ValueError, TypeError, AttributeError) as exc:
        raise SignInFailed("The sign-in took too long or began in another browser; start again.") from exc
    return pending
