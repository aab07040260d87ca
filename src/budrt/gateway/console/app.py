"""The web console at /console: server-rendered pages whose scripts call the same API as anyone.

Signing in exchanges an API key (or an OIDC sign-in, console/oidc.py) for a server-side session
(store/sessions.py): an HttpOnly, SameSite=Strict cookie, Secure over TLS. The pages carry no
data of their own: their scripts fetch /admin/... and /v1/... with the cookie and the session's
CSRF token (auth.py checks both), so every number and every button goes through the same RBAC
as the admin API. Every response carries a strict Content-Security-Policy: scripts and styles
come only from /console/static, nothing inline, and the templates escape every string.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from budrt.config import ConsoleConfig
from budrt.gateway.auth import SESSION_COOKIE, Authenticator
from budrt.security.rbac import Principal
from budrt.store.sessions import Session, SessionStore

if TYPE_CHECKING:
    from budrt.gateway.console.oidc import OIDCSignIn

log = logging.getLogger("budrt.gateway.console")
HERE = Path(__file__).parent
LOGIN_COOKIE = "budrt_login"  # double-submit token of the sign-in form (no session yet)
MAX_FORM_BYTES = 16 * 1024

# (path, title) of each page, in the navigation's order.
PAGES = (
    ("overview", "Overview"),
    ("models", "Models"),
    ("access", "Keys & access"),
    ("usage", "Usage"),
    ("playground", "Playground"),
)
# What the pages' scripts need to know to show or hide a control (the API decides regardless).
CAPABILITIES = (
    "keys:create",
    "keys:list",
    "keys:revoke",
    "keys:update",
    "users:create",
    "users:list",
    "users:update",
    "teams:create",
    "teams:list",
    "teams:update",
    "roles:create",
    "roles:list",
    "roles:assign",
    "audit:read",
    "usage:read:all",
    "usage:read:team",
    "usage:read:own",
    "replicas:list",
    "models:manage",
    "inference:chat",
    "inference:embedding",
    "inference:image",
)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """Adds the console's CSP and hardening headers to every response under /console."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_secured(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        try:
            await self.app(scope, receive, send_secured)
        except HTTPException as exc:
            # A missing static file or a wrong method: answered here, with the headers, rather
            # than by the gateway's handler outside this middleware (which would drop them).
            if started:
                raise
            answer = PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)
            await answer(scope, receive, send_secured)


class Console:
    def __init__(self, config: ConsoleConfig, auth: Authenticator, sessions: SessionStore) -> None:
        self.config = config
        self.auth = auth
        self.sessions = sessions
        self.oidc: OIDCSignIn | None = None
        if config.oidc.enabled:  # imported only then: its httpx is ~75 ms of every gateway's start
            from budrt.gateway.console.oidc import OIDCSignIn

            self.oidc = OIDCSignIn(config.oidc)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True)
        )

    def mount(self) -> Mount:
        routes = [
            Route("/", self.index, methods=["GET"]),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/oidc/start", self.oidc_start, methods=["GET"]),
            Route("/oidc/callback", self.oidc_callback, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=HERE / "static")),
            Route("/{page}", self.page, methods=["GET"]),
            Route("/{path:path}", self.not_found, methods=["GET"]),
        ]
        return Mount("/console", routes=routes, middleware=[Middleware(SecurityHeaders)])

    # -- pages --

    async def index(self, request: Request) -> Response:
        signed_in = await self._signed_in(request)
        return _see_other("/console/overview" if signed_in else "/console/login")

    async def not_found(self, request: Request) -> Response:
        return self._render("not_found.html", {"path": request.url.path}, status=404)

    async def page(self, request: Request) -> Response:
        name = request.path_params["page"]
        if name not in dict(PAGES):
            return await self.not_found(request)
        signed_in = await self._signed_in(request)
        if signed_in is None:
            return _see_other("/console/login")
        session, principal = signed_in
        context = {
            "page": name,
            "title": dict(PAGES)[name],
            "pages": PAGES,
            "csrf": session.csrf,
            "principal": principal,
            # On some resource: a role scoped to a team still sees its controls; the API narrows.
            "can": {action: principal.may(action) for action in CAPABILITIES},
        }
        return self._render(f"{name}.html", context)

    # -- signing in and out --

    async def login_page(self, request: Request, error: str | None = None, status: int = 200) -> Response:
        token = secrets.token_urlsafe(24)
        context = {"login_csrf": token, "error": error, "oidc": self.oidc is not None}
        context["oidc_label"] = self.config.oidc.label
        response = self._render("login.html", context, status=status)
        response.set_cookie(LOGIN_COOKIE, token, path="/console/login", **_cookie_flags(request))
        return response

    async def login(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=4, max_part_size=MAX_FORM_BYTES)
        sent, expected = str(form.get("login_csrf", "")), request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(sent, expected):
            return await self.login_page(request, "The sign-in form expired; try again.", 400)
        key = str(form.get("api_key", "")).strip()
        principal = await self.auth.lookup(key) if key else None
        if principal is None:
            return await self.login_page(request, "That API key is not valid.", 401)
        response = _see_other("/console/overview")
        digest = self.auth.store.hash(key)
        await self._start_session(request, response, f"key:{principal.key_id}", key_hash=digest)
        return response

    async def logout(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=2, max_part_size=MAX_FORM_BYTES)
        token = request.cookies.get(SESSION_COOKIE, "")
        session = await self.auth.session(token) if token else None
        if session is not None and hmac.compare_digest(str(form.get("csrf", "")), session.csrf):
            await run_in_threadpool(self.sessions.delete, token)
            self.auth.forget_session(token)
            log.info("console sign-out", extra={"fields": {"subject": session.subject}})
        response = _see_other("/console/login")
        response.delete_cookie(SESSION_COOKIE, path="/", **_cookie_flags(request))
        return response

    async def oidc_start(self, request: Request) -> Response:
        if self.oidc is None:
            return await self.not_found(request)
        from budrt.gateway.console.oidc import SignInFailed  # loaded with self.oidc

        try:
            location, pending = await self.oidc.start(_callback_url(request, self.config))
        except SignInFailed as exc:
            return await self.login_page(request, str(exc), 502)
        response = RedirectResponse(location, status_code=303)
        flags = _cookie_flags(request) | {"samesite": "lax"}  # comes back from the provider's site
        response.set_cookie(self.oidc.COOKIE, pending, max_age=600, path="/console/oidc", **flags)
        return response

    async def oidc_callback(self, request: Request) -> Response:
        if self.oidc is None:
            return await self.not_found(request)
        from budrt.gateway.console.oidc import SignInFailed  # loaded with self.oidc

        pending = request.cookies.get(self.oidc.COOKIE, "")
        try:
            id_token = await self.oidc.finish(
                request.query_params, pending, _callback_url(request, self.config)
            )
        except SignInFailed as exc:
            return await self.login_page(request, str(exc), 400)
        principal = await self.auth.token_principal(id_token)
        if principal is None:
            return await self.login_page(request, "The provider's ID token was not accepted.", 401)
        # A page of this site moves on (signed_in.html): a redirect chain begun on the
        # provider's site would not carry the new SameSite=Strict cookie.
        response = self._render("signed_in.html", {})
        await self._start_session(request, response, f"jwt:{principal.user}", id_token=id_token)
        response.delete_cookie(self.oidc.COOKIE, path="/console/oidc", **_cookie_flags(request))
        return response

    async def _start_session(
        self, request: Request, response: Response, subject: str, **credential: Any
    ) -> None:
        """Store a new session and set its cookie on `response`."""
        token, _ = await run_in_threadpool(
            self.sessions.create, subject, self.config.session_ttl_s, **credential
        )
        log.info("console sign-in", extra={"fields": {"subject": subject}})
        max_age = int(self.config.session_ttl_s)
        response.set_cookie(SESSION_COOKIE, token, max_age=max_age, path="/", **_cookie_flags(request))
        response.delete_cookie(LOGIN_COOKIE, path="/console/login")

    async def _signed_in(self, request: Request) -> tuple[Session, Principal] | None:
        token = request.cookies.get(SESSION_COOKIE, "")
        session = await self.auth.session(token) if token else None
        principal = await self.auth.session_principal(session) if session is not None else None
        return None if principal is None else (session, principal)  # type: ignore[return-value]

    def _render(self, template: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
        return HTMLResponse(self.templates.get_template(template).render(**context), status_code=status)


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _cookie_flags(request: Request) -> dict[str, Any]:
    return {"httponly": True, "secure": request.url.scheme == "https", "samesite": "strict"}


def _callback_url(request: Request, config: ConsoleConfig) -> str:
    return config.oidc.redirect_url or f"{str(request.base_url).rstrip('/')}/console/oidc/callback"
