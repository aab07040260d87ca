"""JWT bearer tokens: HS256, and RS256/ES256 through a JWKS served over HTTP by the test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from budrt.config import JWTConfig
from budrt.gateway.jwt_auth import JWTVerifier, looks_like_jwt
from budrt.protocol.errors import APIError
from tests.gateway.identity import CHAT, chat, settings, start
from tests.mock_upstream import MockUpstream, ServerThread

ISS, AUD, HS_SECRET = "https://idp.test", "budrt", "hs-secret-0123456789-0123456789-ab"


@dataclass
class Signer:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        data = algo.to_jwk(self.private.public_key(), as_dict=True)
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": now, "exp": now + 60, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})


def rsa_signer(kid: str) -> Signer:
    return Signer(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_signer(kid: str) -> Signer:
    return Signer(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Provider:
    """An OIDC provider's JWKS endpoint; `signers` can be swapped to rotate keys."""

    signers: list[Signer] = field(default_factory=list)
    fetches: int = 0

    async def jwks(self, request: Request) -> JSONResponse:
        self.fetches += 1
        return JSONResponse({"keys": [s.jwk() for s in self.signers]})


@pytest.fixture(scope="module")
def provider() -> Iterator[tuple[Provider, str]]:
    p = Provider([rsa_signer("rsa-1"), ec_signer("ec-1")])
    server = ServerThread(Starlette(routes=[Route("/jwks", p.jwks)])).start()
    yield p, server.url + "/jwks"
    server.stop()


def _config(url: str, **extra: Any) -> JWTConfig:
    return JWTConfig(
        jwks_url=url, secret=HS_SECRET, issuer=ISS, audience=AUD, jwks_min_refresh_s=0.5, **extra
    )


def _verify(verifier: JWTVerifier, token: str) -> Any:
    async def run() -> Any:
        try:
            return await verifier.verify(token)
        finally:
            await verifier.close()

    return asyncio.run(run())


def _refused(verifier: JWTVerifier, token: str) -> str:
    with pytest.raises(APIError) as exc:
        _verify(verifier, token)
    assert exc.value.status == 401 and exc.value.code == "invalid_api_key"
    return exc.value.message


def test_valid_rs256_and_es256(provider: tuple[Provider, str]) -> None:
    p, url = provider
    for signer in p.signers:
        token = signer.token(team="research", roles=["developer"])
        assert looks_like_jwt(token)
        ident = _verify(JWTVerifier(_config(url)), token)
        assert (ident.user, ident.team, ident.roles) == ("alice", "research", ("developer",))


def test_hs256() -> None:
    now = int(time.time())
    claims = {"sub": "bob", "iss": ISS, "aud": AUD, "exp": now + 60, "scope": "viewer developer"}
    verifier = JWTVerifier(JWTConfig(secret=HS_SECRET, issuer=ISS, audience=AUD, roles_claim="scope"))
    assert _verify(verifier, jwt.encode(claims, HS_SECRET, algorithm="HS256")).roles == (
        "viewer",
        "developer",
    )
    assert _refused(verifier, jwt.encode(claims, "another-secret-0123456789-0123456789")) == (
        "Invalid bearer token."
    )
    # A user claim no name could be (it is stored with usage records) is refused; such a team
    # claim is ignored.
    for odd in ("x" * 201, "a\u0000b"):
        assert _refused(verifier, jwt.encode({**claims, "sub": odd}, HS_SECRET)) == (
            "The bearer token's user is not a valid name."
        )
    assert _verify(verifier, jwt.encode({**claims, "team": "t\n"}, HS_SECRET)).team is None
    # No JWKS configured: an asymmetric token has no key to be checked with.
    assert "unknown signing key" in _refused(verifier, ec_signer("x").token())


def test_rejections(provider: tuple[Provider, str]) -> None:
    p, url = provider
    rs = p.signers[0]
    now = int(time.time())
    assert _refused(JWTVerifier(_config(url)), rs.token(exp=now - 5)) == "The bearer token has expired."
    assert _refused(JWTVerifier(_config(url)), rs.token(nbf=now + 60)) == "The bearer token is not valid yet."
    not_ours = "The bearer token was not issued for this service."
    assert _refused(JWTVerifier(_config(url)), rs.token(aud="someone-else")) == not_ours
    assert _refused(JWTVerifier(_config(url)), rs.token(iss="https://evil.test")) == not_ours
    assert _refused(JWTVerifier(_config(url)), rs.token(exp=None)) == "Invalid bearer token."  # exp required
    # Signed by another key under a known kid: a wrong signature.
    forged = Signer(rs.kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert _refused(JWTVerifier(_config(url)), forged.token()) == "Invalid bearer token."
    # alg=none, and HS256 signed with the RSA public key (algorithm confusion).
    unsigned = jwt.encode({"sub": "x", "exp": now + 60}, None, algorithm="none")
    assert _refused(JWTVerifier(_config(url)), unsigned) == "Invalid bearer token."
    only_rs = JWTVerifier(_config(url).model_copy(update={"secret": None}))
    assert _refused(only_rs, jwt.encode({"sub": "x", "exp": now + 60}, "k" * 32, algorithm="HS256"))
    assert _refused(JWTVerifier(_config(url)), rs.token(sub=None)) == "The bearer token names no user."


def test_unknown_kid_after_rotation_refetches_rate_limited(provider: tuple[Provider, str]) -> None:
    p, url = provider
    old = list(p.signers)
    verifier = JWTVerifier(_config(url))

    async def run() -> None:
        assert (await verifier.verify(old[0].token())).user == "alice"
        fetched = p.fetches
        rotated = rsa_signer("rsa-2")
        p.signers = [rotated]
        # Within the refresh interval an unknown kid is refused without another fetch.
        with pytest.raises(APIError):
            await verifier.verify(rotated.token(sub="early"))
        assert p.fetches == fetched
        await asyncio.sleep(0.55)
        # Concurrent tokens with the new kid share one fetch.
        idents = await asyncio.gather(*(verifier.verify(rotated.token()) for _ in range(5)))
        assert {i.user for i in idents} == {"alice"} and p.fetches == fetched + 1
        # Made-up kids cannot make the gateway hammer the provider.
        for i in range(5):
            with pytest.raises(APIError):
                await verifier.verify(Signer(f"bogus-{i}", "RS256", rotated.private).token())
        assert p.fetches == fetched + 1
        await verifier.close()

    try:
        asyncio.run(run())
    finally:
        p.signers = old


def test_gateway_with_jwt(provider: tuple[Provider, str], tmp_path: Any) -> None:
    p, url = provider
    upstream = ServerThread(MockUpstream("up").app).start()
    auth = {"jwt": _config(url, team_claim="org.team").model_dump()}
    auth["jwt"]["secret"] = HS_SECRET
    g = start(settings(tmp_path, upstream.url + "/v1", ["smollm2-135m"], auth=auth))
    try:
        es = p.signers[1]
        dev = es.token(roles=["developer"], org={"team": "research"})
        with g.client(dev) as c:
            assert c.post(CHAT, json=chat("smollm2-135m")).status_code == 200
            usage = c.get("/v1/usage").json()
        assert usage["totals"]["requests"] == 1 and usage["totals"]["prompt_tokens"] == 5
        with g.client(es.token(roles=["viewer"])) as c:
            resp = c.post(CHAT, json=chat("smollm2-135m"))
            assert resp.status_code == 403
            assert resp.json()["error"]["message"] == (
                "This token is not allowed to use chat on model `smollm2-135m`."
            )
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smollm2-135m"]
        with g.client(es.token()) as c:  # no roles claim and no default roles: nothing allowed
            assert c.post(CHAT, json=chat("smollm2-135m")).status_code == 403
        hs = jwt.encode(
            {"sub": "carol", "iss": ISS, "aud": AUD, "exp": int(time.time()) + 60, "roles": ["admin"]},
            HS_SECRET,
        )
        with g.client(hs) as c:
            report = c.get("/admin/usage", params={"group_by": "team"}).json()
        by_team = {row.pop("team"): row for row in report["data"]}
        assert by_team["research"] == {
            "requests": 1,
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "total_tokens": 7,
            "cache_hits": 0,
            "images": 0,
            "pixels": 0,
            "steps": 0,
        }
        assert by_team[None]["requests"] == 2 and by_team[None]["total_tokens"] == 0  # the two 403s
        with g.client(es.token(exp=int(time.time()) - 1)) as c:
            assert c.post(CHAT, json=chat("smollm2-135m")).status_code == 401
    finally:
        g.stop()
        upstream.stop()


def test_weak_jwt_settings_refuse_to_start(tmp_path: Any) -> None:
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from budrt.cli.app import app
    from budrt.config import Settings

    url = "https://idp.test/jwks"
    # A JWKS without audience and issuer accepts any token the provider signs, for anyone.
    for partial in ({}, {"audience": AUD}, {"issuer": ISS}, {"audience": "", "issuer": ISS}):
        with pytest.raises(ValidationError, match="audience and issuer are required"):
            JWTConfig(jwks_url=url, **partial)
    assert JWTConfig(jwks_url=url, audience=AUD, issuer=ISS).enabled
    # An HS256 secret shorter than 32 bytes can be brute-forced from one token.
    for short in ("secret", "x" * 31):
        with pytest.raises(ValidationError, match="at least 32 bytes"):
            JWTConfig(secret=short)
    assert JWTConfig(secret="x" * 32).enabled and JWTConfig(secret="é" * 16).enabled  # bytes, not chars
    with pytest.raises(ValidationError):
        Settings(home=tmp_path, auth={"jwt": {"secret": "too-short"}})
    # Through the CLI: a clear error, no traceback, a non-zero exit.
    env = {"BUDRT_HOME": str(tmp_path), "BUDRT_AUTH__JWT__JWKS_URL": url}
    result = CliRunner().invoke(app, ["config", "show"], env=env)
    assert result.exit_code == 2 and "audience and issuer are required" in result.output
    assert "Traceback" not in result.output
