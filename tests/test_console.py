"""The web console's server side over real HTTP (no browser): signing in with a key or through a
real OIDC provider (tests/oidc_provider.py), the session cookie's flags, CSRF on the API and on
signing out, sessions ending (sign-out, revoked key, expiry, expired ID token), the security
headers on every /console response, escaping, and what each built-in role may open."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from budrt.config import Settings
from budrt.gateway.app import create_app
from budrt.gateway.console.app import CSP, PAGES
from budrt.security import certs
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from budrt.store.usage import Usage, UsageStore
from tests.mock_upstream import ServerThread
from tests.oidc_provider import OIDCProvider, s256
from tests.procs import start_gateway, stop

CONSOLE = Path(__file__).resolve().parent.parent / "src/budrt/gateway/console"
PAGE_NAMES = [name for name, _ in PAGES]
LOGIN_CSRF = re.compile(r'name="login_csrf" value="([^"]+)"')
META_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]+)">')
XSS_NAME = "<img src=x onerror=alert(1)>"
AUTH_TTL_S = 0.3  # auth.cache_ttl_s: how long a revoked key or ended session may still pass


@dataclass
class Gateway:
    url: str
    store: KeyStore
    settings: Settings
    keys: dict[str, str]  # role -> plaintext key
    key_ids: dict[str, int]
    server: ServerThread

    def browser(self, **extra: Any) -> httpx.Client:
        """A client that keeps cookies and, like a browser's fetch, sees each redirect."""
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=10, **extra)

    def admin(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys['admin']}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


def _settings(home: Path, provider: OIDCProvider | None = None, **extra: Any) -> Settings:
    auth: dict[str, Any] = {"cache_ttl_s": AUTH_TTL_S}
    console: dict[str, Any] = dict(extra.pop("console", {}))
    if provider is not None:
        auth["jwt"] = {
            "jwks_url": provider.jwks_url,
            "issuer": provider.issuer,
            "audience": provider.client_id,
        }
        console["oidc"] = {"issuer": provider.issuer, "client_id": provider.client_id}
    return Settings(home=home, secret_key="test-secret-test-secret", auth=auth, console=console, **extra)


def _start(settings: Settings) -> Gateway:
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    keys, ids = {}, {}
    for role in ("admin", "developer", "viewer"):
        key, record = store.create(f"console-{role}", role=role)
        keys[role], ids[role] = key, record.id
    server = ServerThread(create_app(settings, key_store=store)).start()
    return Gateway(server.url, store, settings, keys, ids, server)


@pytest.fixture(scope="module")
def provider() -> Iterator[OIDCProvider]:
    p = OIDCProvider().start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, provider: OIDCProvider) -> Iterator[Gateway]:
    g = _start(_settings(tmp_path_factory.mktemp("console"), provider))
    yield g
    g.server.stop()
    g.store.db.dispose()


@pytest.fixture
def idp(provider: OIDCProvider) -> Iterator[OIDCProvider]:
    """The module's provider, its user and behavior reset after each test."""
    yield provider
    provider.user, provider.roles, provider.team = "alice", ["admin"], "research"
    provider.deny, provider.token_ttl_s = False, 300


# -- helpers --


def _sign_in(client: httpx.Client, key: str, csrf: str | None = "from-form") -> httpx.Response:
    page = client.get("/console/login")
    assert page.status_code == 200
    form = {"api_key": key}
    if csrf == "from-form":
        form["login_csrf"] = LOGIN_CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    elif csrf is not None:
        form["login_csrf"] = csrf
    return client.post("/console/login", data=form)


def _signed_in(gw: Gateway, role_or_key: str) -> tuple[httpx.Client, str]:
    """A browser signed in with a role's key (or a key given as is) and its session's CSRF token."""
    client = gw.browser()
    r = _sign_in(client, gw.keys.get(role_or_key, role_or_key))
    assert r.status_code == 303, r.text
    return client, _csrf(client)


def _csrf(client: httpx.Client) -> str:
    page = client.get("/console/overview")
    assert page.status_code == 200, page.text
    return META_CSRF.search(page.text).group(1)  # type: ignore[union-attr]


def _cookie(response: httpx.Response, name: str) -> dict[str, str]:
    """The attributes of the Set-Cookie for `name` (lower-case names; value under 'value')."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(f"{name}="):
            first, *attrs = (part.strip() for part in header.split(";"))
            found = {"value": first.split("=", 1)[1]}
            for attr in attrs:
                k, _, v = attr.partition("=")
                found[k.lower()] = v or "true"
            return found
    raise AssertionError(f"no Set-Cookie for {name}: {response.headers.get_list('set-cookie')}")


def _until(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _api_ends(client: httpx.Client, csrf: str) -> bool:
    return client.get("/admin/keys", headers={"x-csrf-token": csrf}).status_code == 401


# -- signing in with a key --


def test_signing_in_with_a_key_sets_a_strict_httponly_session_cookie(gw: Gateway) -> None:
    client = gw.browser()
    page = client.get("/console/login")
    login = _cookie(page, "budrt_login")
    assert login["httponly"] == "true" and login["samesite"].lower() == "strict"
    assert login["path"] == "/console/login" and "secure" not in login  # plain HTTP
    r = _sign_in(client, gw.keys["admin"])
    assert r.status_code == 303 and r.headers["location"] == "/console/overview"
    cookie = _cookie(r, "budrt_session")
    assert cookie["httponly"] == "true" and cookie["samesite"].lower() == "strict"
    assert cookie["path"] == "/" and "secure" not in cookie
    assert int(cookie["max-age"]) == int(gw.settings.console.session_ttl_s)
    assert len(cookie["value"]) >= 40  # 32 random bytes
    assert gw.keys["admin"] not in r.headers.get_list("set-cookie")[0]
    assert _cookie(r, "budrt_login")["max-age"] == "0"  # the form's token is spent
    overview = client.get("/console/overview")
    assert overview.status_code == 200 and overview.headers["content-type"].startswith("text/html")
    assert 'data-principal="console-admin"' in overview.text


def test_a_wrong_key_gets_401_and_the_form_again(gw: Gateway) -> None:
    for key in ("budrt-" + "0" * 40, "not-a-key", gw.keys["admin"] + "x"):
        client = gw.browser()
        r = _sign_in(client, key)
        assert r.status_code == 401
        assert "That API key is not valid." in r.text and 'name="login_csrf"' in r.text
        assert "budrt_session" not in client.cookies
        assert client.get("/console/overview").status_code == 303


def test_the_sign_in_form_needs_its_csrf_token(gw: Gateway) -> None:
    for sent in (None, "", "wrong-token"):
        client = gw.browser()
        r = _sign_in(client, gw.keys["admin"], csrf=sent)
        assert r.status_code == 400, sent
        assert "The sign-in form expired" in r.text
        assert "budrt_session" not in client.cookies
    # The form's token without its cookie (a cross-site post, or another browser's form).
    client = gw.browser()
    token = LOGIN_CSRF.search(client.get("/console/login").text).group(1)  # type: ignore[union-attr]
    r = gw.browser().post("/console/login", data={"login_csrf": token, "api_key": gw.keys["admin"]})
    assert r.status_code == 400


def test_pages_send_a_browser_without_a_session_to_the_sign_in(gw: Gateway) -> None:
    client = gw.browser()
    for path in ["/console/", *(f"/console/{p}" for p in PAGE_NAMES)]:
        r = client.get(path)
        assert (r.status_code, r.headers["location"]) == (303, "/console/login"), path
    signed, _ = _signed_in(gw, "admin")
    assert signed.get("/console/").headers["location"] == "/console/overview"


def test_the_api_takes_a_session_only_with_its_csrf_header(gw: Gateway) -> None:
    client, csrf = _signed_in(gw, "admin")
    assert client.get("/admin/keys").status_code == 403
    r = client.get("/admin/keys", headers={"x-csrf-token": "not-the-token"})
    assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"]
    r = client.post("/admin/keys", json={"name": "csrf-less"})
    assert r.status_code == 403  # a cross-site form or fetch cannot add the header
    ok = client.get("/admin/keys", headers={"x-csrf-token": csrf})
    assert ok.status_code == 200
    assert "csrf-less" not in {k["name"] for k in ok.json()["data"]}
    made = client.post("/admin/keys", json={"name": "with-csrf"}, headers={"x-csrf-token": csrf})
    assert made.status_code == 201 and made.json()["key"].startswith("budrt-")


def test_a_forged_session_cookie_is_refused(gw: Gateway) -> None:
    _, csrf = _signed_in(gw, "admin")
    for forged in ("forged", "A" * 43, ""):
        client = gw.browser(cookies={"budrt_session": forged})
        r = client.get("/admin/keys", headers={"x-csrf-token": csrf})
        assert r.status_code == 401, forged
        assert client.get("/console/overview").headers["location"] == "/console/login"


def test_signing_out_needs_the_form_token_and_ends_the_session(gw: Gateway) -> None:
    client, csrf = _signed_in(gw, "admin")
    token = client.cookies["budrt_session"]
    # Without the token (a cross-site form): the browser's cookie is dropped, the session lives.
    r = client.post("/console/logout", data={})
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    again = gw.browser(cookies={"budrt_session": token})
    assert again.get("/admin/keys", headers={"x-csrf-token": csrf}).status_code == 200
    again.post("/console/logout", data={"csrf": "wrong"})
    assert gw.browser(cookies={"budrt_session": token}).get("/console/overview").status_code == 200
    # With it: over at once, on every request that still carries the old cookie.
    r = gw.browser(cookies={"budrt_session": token}).post("/console/logout", data={"csrf": csrf})
    assert r.status_code == 303 and _cookie(r, "budrt_session")["max-age"] == "0"
    stale = gw.browser(cookies={"budrt_session": token})
    assert stale.get("/admin/keys", headers={"x-csrf-token": csrf}).status_code == 401
    assert stale.get("/console/overview").headers["location"] == "/console/login"


def test_revoking_the_key_ends_its_session(gw: Gateway) -> None:
    with gw.admin() as admin:
        made = admin.post("/admin/keys", json={"name": "short-lived", "role": "developer"}).json()
        client, csrf = _signed_in(gw, made["key"])
        assert client.get("/v1/models", headers={"x-csrf-token": csrf}).status_code == 200
        assert admin.delete(f"/admin/keys/{made['id']}").status_code == 200
    _until(lambda: _api_ends(client, csrf), timeout_s=AUTH_TTL_S + 5)
    assert client.get("/console/overview").headers["location"] == "/console/login"
    assert _sign_in(gw.browser(), made["key"]).status_code == 401


def test_a_session_expires_on_time(tmp_path: Path) -> None:
    """At its expiry, even while the gateway's auth cache (30 s here) still holds it."""
    settings = _settings(tmp_path, console={"session_ttl_s": 2.0})
    settings = settings.model_copy(update={"auth": settings.auth.model_copy(update={"cache_ttl_s": 30.0})})
    g = _start(settings)
    try:
        client, csrf = _signed_in(g, "admin")
        started = time.monotonic()
        assert client.get("/admin/keys", headers={"x-csrf-token": csrf}).status_code == 200
        token = client.cookies["budrt_session"]  # sent on, as by a browser with a skewed clock
        stale = g.browser(cookies={"budrt_session": token})
        _until(lambda: _api_ends(stale, csrf), timeout_s=2.0 + 2)
        assert time.monotonic() - started >= 2.0 - 0.5
        assert stale.get("/console/overview").headers["location"] == "/console/login"
    finally:
        g.server.stop()
        g.store.db.dispose()


def test_the_session_cookie_is_secure_over_tls(tmp_path: Path) -> None:
    settings = _settings(tmp_path, tls={"enabled": True})
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("tls-console", role="admin")
    proc, url = start_gateway(settings, tmp_path / "runtime.json")
    try:
        paths = certs.cert_paths(settings.tls, tmp_path)
        verify = certs.client_context(paths, with_client_cert=False)
        with httpx.Client(base_url=url, verify=verify, timeout=10) as client:
            assert url.startswith("https://")
            assert _cookie(client.get("/console/login"), "budrt_login")["secure"] == "true"
            r = _sign_in(client, key)
            cookie = _cookie(r, "budrt_session")
            assert r.status_code == 303 and cookie["secure"] == "true" and cookie["httponly"] == "true"
            assert client.get("/console/overview").status_code == 200  # the jar sends it over https
    finally:
        stop(proc)
        store.db.dispose()


# -- what every response carries --


def test_every_console_response_has_the_csp_and_nosniff(gw: Gateway, idp: OIDCProvider) -> None:
    client, csrf = _signed_in(gw, "admin")
    anon = gw.browser()
    responses = {
        "login": anon.get("/console/login"),
        "login failed": _sign_in(gw.browser(), "budrt-wrong"),
        "login csrf": _sign_in(gw.browser(), gw.keys["admin"], csrf=None),
        "index": anon.get("/console/"),
        "redirect to login": anon.get("/console/overview"),
        "not found": client.get("/console/no-such-page"),
        "not found deeper": client.get("/console/no/such/page"),
        "wrong method": client.post("/console/overview"),
        "static css": anon.get("/console/static/console.css"),
        "static js": anon.get("/console/static/js/api.js"),
        "vendored": anon.get("/console/static/vendor/uplot/uPlot.esm.js"),
        "static missing": anon.get("/console/static/js/missing.js"),
        "oidc start": anon.get("/console/oidc/start"),
        "oidc callback error": anon.get("/console/oidc/callback?state=x&code=y"),
        **{page: client.get(f"/console/{page}") for page in PAGE_NAMES},
        "logout": client.post("/console/logout", data={"csrf": csrf}),
    }
    for what, r in responses.items():
        assert r.headers.get("content-security-policy") == CSP, (what, r.status_code, dict(r.headers))
        assert r.headers.get("x-content-type-options") == "nosniff", what
        assert r.headers.get("x-frame-options") == "DENY", what
    assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    assert responses["not found"].status_code == 404
    assert responses["static missing"].status_code == 404
    assert responses["not found deeper"].status_code == 404
    assert responses["wrong method"].status_code == 405
    # With nosniff, a module script of any other type would not run.
    assert "javascript" in responses["static js"].headers["content-type"]
    assert "javascript" in responses["vendored"].headers["content-type"]
    assert responses["static css"].headers["content-type"].startswith("text/css")


def test_pages_have_nothing_inline_that_the_csp_would_block(gw: Gateway) -> None:
    client, _ = _signed_in(gw, "admin")
    pages = {p: client.get(f"/console/{p}").text for p in PAGE_NAMES}
    pages["login"] = gw.browser().get("/console/login").text
    for name, html in pages.items():
        for script in re.findall(r"<script\b[^>]*>", html, flags=re.I):
            assert "src=" in script, (name, script)  # no inline script
        assert not re.search(r"<style\b", html, flags=re.I), name
        assert not re.search(r"\sstyle\s*=", html, flags=re.I), name
        assert not re.search(r"\son[a-z]+\s*=", html, flags=re.I), name
        assert "javascript:" not in html.lower(), name


def test_page_scripts_insert_no_markup_from_data() -> None:
    """The XSS rule of the console's scripts (the browser test checks the behavior): no HTML
    parsing of strings, no eval."""
    risky = re.compile(
        r"\.innerHTML\s*[+]?=\s*(?![\"'`]\s*[\"'`])|\.outerHTML\s*=|insertAdjacentHTML|document\.write"
        r"|\beval\(|new Function\(|setTimeout\(\s*[\"'`]|createContextualFragment"
    )
    scripts = sorted((CONSOLE / "static/js").rglob("*.js"))
    assert scripts
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for path in scripts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if risky.search(line)
    ]
    assert not found, "\n".join(found)


def test_a_key_named_like_markup_shows_as_text(gw: Gateway) -> None:
    key, _ = gw.store.create(XSS_NAME, role="viewer")
    client, _ = _signed_in(gw, key)
    for page in PAGE_NAMES:
        html = client.get(f"/console/{page}").text
        assert "&lt;img src=x onerror=alert(1)&gt;" in html, page
        assert "<img src=x" not in html, page


# -- OIDC --


def _oidc_redirects(client: httpx.Client) -> tuple[httpx.Response, str]:
    """/console/oidc/start, then the provider's /authorize: (the start response, the callback URL
    the provider sends the browser to)."""
    start = client.get("/console/oidc/start")
    assert start.status_code == 303, start.text
    back = client.get(start.headers["location"])
    assert back.status_code == 302, back.text
    return start, back.headers["location"]


def test_oidc_sign_in_with_pkce(gw: Gateway, idp: OIDCProvider) -> None:
    idp.user, idp.roles, idp.team = f"oidc-{uuid.uuid4().hex[:6]}", ["admin"], "research"
    client = gw.browser()
    start, callback = _oidc_redirects(client)
    where = urlsplit(start.headers["location"])
    query = {k: v[0] for k, v in parse_qs(where.query).items()}
    assert f"{where.scheme}://{where.netloc}{where.path}" == f"{idp.issuer}/authorize"
    assert query["response_type"] == "code" and query["client_id"] == idp.client_id
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["redirect_uri"] == f"{gw.url}/console/oidc/callback"
    assert query["state"] and query["nonce"] and "openid" in query["scope"].split()
    pending = _cookie(start, "budrt_oidc")
    assert pending["httponly"] == "true" and pending["samesite"].lower() == "lax"
    assert pending["path"] == "/console/oidc" and int(pending["max-age"]) <= 600
    assert urlsplit(callback).path == "/console/oidc/callback"

    done = client.get(callback)
    assert done.status_code == 200, done.text
    assert _cookie(done, "budrt_oidc")["max-age"] == "0"
    session = _cookie(done, "budrt_session")
    assert session["httponly"] == "true" and session["samesite"].lower() == "strict"
    # The token request proved the verifier behind the challenge (the provider checked it too).
    sent = idp.token_requests[-1]
    assert s256(sent["code_verifier"]) == query["code_challenge"]
    assert sent["code_verifier"] not in start.headers["location"]

    page = client.get("/console/overview")
    assert page.status_code == 200
    assert f'data-principal="{idp.user}"' in page.text and 'data-kind="jwt"' in page.text
    assert re.search(r'class="roles">\s*admin\s*<', page.text)
    csrf = META_CSRF.search(page.text).group(1)  # type: ignore[union-attr]
    assert client.get("/admin/keys", headers={"x-csrf-token": csrf}).status_code == 200
    # The session is the token's: a developer's token gets a developer's answers.
    idp.user, idp.roles = f"dev-{uuid.uuid4().hex[:6]}", ["developer"]
    dev = gw.browser()
    assert dev.get(_oidc_redirects(dev)[1]).status_code == 200
    dev_csrf = _csrf(dev)
    assert dev.get("/admin/keys", headers={"x-csrf-token": dev_csrf}).status_code == 403
    assert dev.get("/v1/models", headers={"x-csrf-token": dev_csrf}).status_code == 200


def test_oidc_wrong_state_is_refused(gw: Gateway, idp: OIDCProvider) -> None:
    client = gw.browser()
    _, callback = _oidc_redirects(client)
    forged = re.sub(r"state=[^&]+", "state=forged-state", callback)
    r = client.get(forged)
    assert r.status_code == 400 and "state does not match" in r.text
    assert "budrt_session" not in client.cookies
    # Without the pending-sign-in cookie (another browser, or too late).
    r = gw.browser().get(callback)
    assert r.status_code == 400 and "start again" in r.text


def test_oidc_provider_error_is_shown(gw: Gateway, idp: OIDCProvider) -> None:
    idp.deny = True
    client = gw.browser()
    _, callback = _oidc_redirects(client)
    assert "error=access_denied" in callback
    r = client.get(callback)
    assert r.status_code == 400
    assert "The identity provider refused the sign-in: The user declined the sign-in." in r.text
    assert "budrt_session" not in client.cookies


def test_oidc_code_cannot_be_replayed(gw: Gateway, idp: OIDCProvider) -> None:
    client = gw.browser()
    _, callback = _oidc_redirects(client)
    pending = client.cookies["budrt_oidc"]
    assert client.get(callback).status_code == 200
    # The whole callback again, pending cookie included (as an attacker holding both would).
    replay = gw.browser(cookies={"budrt_oidc": pending})
    r = replay.get(callback)
    assert r.status_code == 400 and "refused the code (invalid_grant)" in r.text
    assert "budrt_session" not in replay.cookies


def test_an_oidc_session_ends_with_its_id_token(gw: Gateway, idp: OIDCProvider) -> None:
    idp.token_ttl_s = 2
    client = gw.browser()
    assert client.get(_oidc_redirects(client)[1]).status_code == 200
    csrf = _csrf(client)
    _until(lambda: _api_ends(client, csrf), timeout_s=2 + AUTH_TTL_S + 5)
    assert client.get("/console/overview").headers["location"] == "/console/login"


def test_oidc_needs_auth_jwt_trusting_the_same_provider(tmp_path: Path) -> None:
    oidc = {"issuer": "https://idp.test", "client_id": "console"}
    with pytest.raises(ValidationError, match="console.oidc needs auth.jwt"):
        Settings(home=tmp_path, console={"oidc": oidc})
    jwt = {"jwks_url": "https://idp.test/jwks", "issuer": "https://idp.test", "audience": "other"}
    with pytest.raises(ValidationError, match="console.oidc needs auth.jwt"):
        Settings(home=tmp_path, console={"oidc": oidc}, auth={"jwt": jwt})
    with pytest.raises(ValidationError, match="client_id is required"):
        Settings(home=tmp_path, console={"oidc": {"issuer": "https://idp.test"}}, auth={"jwt": jwt})
    ok = Settings(home=tmp_path, console={"oidc": oidc}, auth={"jwt": {**jwt, "audience": "console"}})
    assert ok.console.oidc.enabled


def test_oidc_start_is_404_when_not_configured(tmp_path: Path) -> None:
    g = _start(_settings(tmp_path))
    try:
        client = g.browser()
        assert client.get("/console/oidc/start").status_code == 404
        assert client.get("/console/oidc/callback?code=x&state=y").status_code == 404
        assert 'id="oidc"' not in client.get("/console/login").text
    finally:
        g.server.stop()
        g.store.db.dispose()


# -- what each built-in role may open --


@pytest.mark.parametrize("role", ["admin", "developer", "viewer"])
def test_every_role_may_open_every_page(gw: Gateway, role: str) -> None:
    client, _ = _signed_in(gw, role)
    for page in PAGE_NAMES:
        r = client.get(f"/console/{page}")
        assert r.status_code == 200, (role, page)
        assert f'data-page="{page}"' in r.text and f"/console/static/js/{page}.js" in r.text
    can = re.search(r'data-can="([^"]+)"', r.text).group(1)  # type: ignore[union-attr]
    admin = role == "admin"
    assert ("&#34;keys:create&#34;: true" in can) is admin
    assert ("&#34;usage:read:all&#34;: true" in can) is admin
    assert "&#34;usage:read:own&#34;: true" in can


@pytest.mark.parametrize(("role", "keys_list"), [("admin", 200), ("developer", 403), ("viewer", 403)])
def test_each_role_reads_the_usage_series_it_may(gw: Gateway, role: str, keys_list: int) -> None:
    now = datetime.now(UTC)
    rows = [
        Usage(
            at=now - timedelta(seconds=30),
            key_id=gw.key_ids[who],
            user=None,
            team=None,
            model=f"model-{who}",
            endpoint="/v1/chat/completions",
            prompt_tokens=10,
            completion_tokens=5,
            latency_ms=100.0,
            status=200,
            cache_hit=False,
            request_id=f"series-{who}-{role}",
            ttft_ms=20.0,
        )
        for who in ("admin", "developer", "viewer")
    ]
    UsageStore(gw.store.db).insert(rows)
    client, csrf = _signed_in(gw, role)
    headers = {"x-csrf-token": csrf}
    r = client.get("/admin/usage/series", params={"group_by": "key"}, headers=headers)
    assert r.status_code == 200, r.text
    groups = {str(point["group"]) for point in r.json()["data"]}
    if role == "admin":
        assert {str(i) for i in gw.key_ids.values()} <= groups
    else:
        assert groups == {str(gw.key_ids[role])}
    models = {p["group"] for p in client.get("/admin/usage/series", headers=headers).json()["data"]}
    if role == "admin":
        assert models >= {"model-admin", "model-developer", "model-viewer"}
    else:
        assert models == {f"model-{role}"}
    assert client.get("/admin/keys", headers=headers).status_code == keys_list
    other = client.get("/admin/usage", headers=headers)  # totals by group: team or all only
    assert other.status_code == (200 if role == "admin" else 403)
