"""A small, real OpenID Connect provider for the console's sign-in tests: discovery, an
/authorize that approves one configured user at once (or refuses, `deny`), a /token endpoint
that checks the client, the redirect URI and the PKCE verifier (S256) and accepts each code
once, and RS256 ID tokens whose keys are published at /jwks.json. Served by uvicorn in a thread
on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.mock_upstream import ServerThread

KID = "test-rsa-1"


@dataclass
class Grant:
    """What /authorize remembered about a code, for /token to check."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None


@dataclass
class OIDCProvider:
    client_id: str = "budrt-console"
    user: str = "alice"
    roles: list[str] = field(default_factory=lambda: ["admin"])
    team: str | None = "research"
    token_ttl_s: int = 300
    deny: bool = False  # /authorize answers error=access_denied
    authorizations: list[dict[str, str]] = field(default_factory=list)  # the query of each /authorize
    token_requests: list[dict[str, str]] = field(default_factory=list)  # the form of each /token
    _codes: dict[str, Grant] = field(default_factory=dict)
    _key: Any = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    _server: ServerThread | None = None

    @property
    def issuer(self) -> str:
        assert self._server is not None, "start() the provider first"
        return self._server.url

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks.json"

    def start(self) -> OIDCProvider:
        routes = [
            Route("/.well-known/openid-configuration", self.discovery, methods=["GET"]),
            Route("/authorize", self.authorize, methods=["GET"]),
            Route("/token", self.token, methods=["POST"]),
            Route("/jwks.json", self.jwks, methods=["GET"]),
        ]
        self._server = ServerThread(Starlette(routes=routes)).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def id_token(self, nonce: str | None, **claims: Any) -> str:
        """An ID token of the configured user (claims given here override or, as None, drop)."""
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "aud": self.client_id,
            "sub": self.user,
            "iat": now,
            "exp": now + self.token_ttl_s,
            "nonce": nonce,
            "roles": self.roles,
            "team": self.team,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self._key, algorithm="RS256", headers={"kid": KID})

    # -- endpoints --

    async def discovery(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": self.jwks_url,
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def jwks(self, request: Request) -> Response:
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        return JSONResponse({"keys": [{**public, "kid": KID, "alg": "RS256", "use": "sig"}]})

    async def authorize(self, request: Request) -> Response:
        q = dict(request.query_params)
        self.authorizations.append(q)
        if q.get("client_id") != self.client_id or not q.get("redirect_uri"):
            # Never redirect to an unverified URI: an error page of the provider's own.
            return JSONResponse({"error": "invalid_client"}, status_code=400)
        back = {"state": q.get("state", "")}
        if self.deny:
            back |= {"error": "access_denied", "error_description": "The user declined the sign-in."}
        elif q.get("response_type") != "code" or q.get("code_challenge_method") != "S256":
            back |= {"error": "invalid_request", "error_description": "code + PKCE S256 required"}
        elif not q.get("code_challenge"):
            back |= {"error": "invalid_request", "error_description": "code_challenge required"}
        else:
            code = secrets.token_urlsafe(24)
            self._codes[code] = Grant(q["client_id"], q["redirect_uri"], q["code_challenge"], q.get("nonce"))
            back["code"] = code
        return RedirectResponse(f"{q['redirect_uri']}?{urlencode(back)}", status_code=302)

    async def token(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.token_requests.append(form)
        if form.get("grant_type") != "authorization_code":
            return _token_error("unsupported_grant_type")
        grant = self._codes.pop(form.get("code", ""), None)  # single use, even when refused below
        if grant is None:
            return _token_error("invalid_grant")
        if form.get("client_id") != grant.client_id or form.get("redirect_uri") != grant.redirect_uri:
            return _token_error("invalid_grant")
        if s256(form.get("code_verifier", "")) != grant.code_challenge:
            return _token_error("invalid_grant")
        return JSONResponse(
            {
                "access_token": secrets.token_urlsafe(24),
                "token_type": "Bearer",
                "expires_in": self.token_ttl_s,
                "id_token": self.id_token(grant.nonce),
            },
            headers={"cache-control": "no-store"},
        )


def s256(verifier: str) -> str:
    """The PKCE S256 code challenge of a verifier (RFC 7636 §4.2)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _token_error(error: str) -> Response:
    return JSONResponse({"error": error}, status_code=400, headers={"cache-control": "no-store"})
