"""The gateway ASGI app: auth, routing and proxying of the OpenAI API to model servers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import orjson
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from budrt.config import Settings, reveal
from budrt.gateway.admin import AdminAPI
from budrt.gateway.auth import Authenticator, require_model
from budrt.gateway.console.app import Console
from budrt.gateway.forwarding import (
    Forwarder,
    Outgoing,
    dump_body,
    image_count,
    key_limits,
    make_limiter,
    model_limits,
    reserve_tokens,
    stream_flag,
)
from budrt.gateway.health import HealthChecker
from budrt.gateway.images import ImageFiles, ask_for_b64, form_fields
from budrt.gateway.jwt_auth import JWTVerifier
from budrt.gateway.metering import MODEL, PRINCIPAL, Meter, metered, spool_dir
from budrt.gateway.metrics import RequestTracker
from budrt.gateway.openapi import openapi_endpoint
from budrt.gateway.proxy import Proxy
from budrt.gateway.ratelimit import Limit, LimiterUnavailable, RateLimited
from budrt.gateway.routing import MODEL_IN_FLIGHT, Deployment, Router
from budrt.gateway.stream import Buffered, UpstreamStream
from budrt.observe.metrics import metrics_endpoint
from budrt.observe.tracing import (
    UNTRACED,
    Phases,
    RequestTrace,
    Tracing,
    begin_request,
    current_request,
    enter_request,
    leave_request,
    sending_request_id,
    stamp_request_id,
)
from budrt.protocol.body_limit import BodyLimit, declared_length
from budrt.protocol.errors import (
    CLIENT_CLOSED,
    APIError,
    body_too_large,
    client_left,
    database_unavailable,
    internal_error,
    invalid_request,
    model_not_found,
    parse_json_body,
)
from budrt.security import certs
from budrt.security.kms import make_key_provider
from budrt.security.rbac import ENDPOINT_ACTIONS, Principal
from budrt.security.signed_urls import url_key
from budrt.store.database import is_unavailable
from budrt.store.identity import IdentityStore
from budrt.store.keys import KeyStore
from budrt.store.object_stores import make_object_store
from budrt.store.quotas import period_usage
from budrt.store.sessions import SessionStore
from budrt.store.usage import UsageStore

log = logging.getLogger("budrt.gateway")

# Client path -> path appended to an endpoint's base URL (which ends in /v1).
PROXIED_PATHS = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/completions": "/completions",
    "/v1/embeddings": "/embeddings",
    "/v1/images/generations": "/images/generations",
    "/v1/images/edits": "/images/edits",
}
IMAGES_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"  # a multipart form, forwarded as it came
EMBEDDINGS_PATH = "/v1/embeddings"


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class Gateway:
    def __init__(self, settings: Settings, store: KeyStore, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.store = store
        self.tracing = tracing  # None: tracing is off
        self.router = Router(
            settings.deployments, settings.gateway, reveal(settings.internal_key), settings.zone
        )
        MODEL_IN_FLIGHT.track(self.router)
        self.identity = IdentityStore(store.db)
        self.jwt = JWTVerifier(settings.auth.jwt) if settings.auth.jwt.enabled else None
        sessions = SessionStore(store.db) if settings.console.enabled else None  # console sign-ins
        self.auth = Authenticator(
            store,
            settings.auth.cache_ttl_s,
            stale_window_s=settings.auth.stale_key_window_s,
            identity=self.identity,
            jwt=self.jwt,
            sessions=sessions,
        )
        self.console = Console(settings.console, self.auth, sessions) if sessions is not None else None
        self.usage = UsageStore(store.db)
        objects = make_object_store(settings)  # images, and usage spool archives
        metering = settings.metering
        spool_keys = make_key_provider(settings) if metering.encrypt_spool else None
        archive = objects if metering.archive else None
        self.meter = (
            Meter(self.usage, metering, spool_dir(settings.home), spool_keys, archive)
            if metering.enabled
            else None
        )
        self.admin = AdminAPI(self.auth, store, self.identity, self.usage, self.meter)
        # In process, budgets start from the usage recorded this period (survive a restart).
        self.limiter = make_limiter(settings.gateway, seed=partial(period_usage, store.db))
        self.model_limits = model_limits(settings.deployments)
        platform_tls = certs.platform_paths(settings.tls, settings.home)
        self.proxy = Proxy(settings.gateway, certs.upstream_context(platform_tls) if platform_tls else None)
        self.forwarder = Forwarder(settings.gateway, self.router, self.proxy, self.limiter, self.model_limits)
        self.health = HealthChecker(self.router, settings.gateway.health_interval_s)
        self.images = ImageFiles(objects, settings.gateway, url_key(settings))
        self.created = int(time.time())
        self.max_body = settings.gateway.max_body_bytes

    async def close_clients(self) -> None:
        """Close the HTTP clients to the JWKS, the OIDC provider and the upstreams."""
        if self.jwt is not None:
            await self.jwt.close()
        if self.console is not None and self.console.oidc is not None:
            await self.console.oidc.close()
        await self.forwarder.close()

    async def live(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """`scope=models` (default): every model has a ready model server (`budrt serve` is up).
        `scope=gateway`: this gateway can route (it has checked its model servers once, whatever
        they answered), the readiness of a gateway pod: a model whose servers are all down must
        not take every gateway out of its Service, and traffic for the other models with it."""
        scope = request.query_params.get("scope", "models")
        if scope not in ("models", "gateway"):
            raise invalid_request("'scope' must be 'models' or 'gateway'.", param="scope")
        if scope == "gateway":
            waiting = [] if self.health.rounds else ["the first health check of the model servers"]
        else:
            waiting = [d.name for d in self.router.deployments if not d.is_ready()]
        if not waiting:
            return _json({"status": "ready"})
        raise APIError(
            503,
            "Waiting for model servers: " + ", ".join(waiting),
            code="not_ready",
            headers={"Retry-After": "1"},
        )

    def _model_object(self, model_id: str, task: str | None) -> dict[str, Any]:
        model = {"id": model_id, "object": "model", "created": self.created, "owned_by": "budrt"}
        return model if task is None else {**model, "task": task}

    async def list_models(self, request: Request) -> Response:
        key = await self.auth.authenticate(request.headers)
        deps = self.router.deployments
        data = [
            self._model_object(d.name, d.task)
            for d in deps
            if key.can_use_model("models:list", d.name, *d.aliases)
        ]
        return _json({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        key = await self.auth.authenticate(request.headers)
        model = request.path_params["model"]
        dep = self.router.resolve(model)
        if dep is None or not key.can_use_model("models:list", dep.name, model):
            raise model_not_found(model)
        return _json(self._model_object(model, dep.task))

    def _deployment(self, key: Principal, data: dict[str, Any]) -> tuple[str, Deployment]:
        """The model a request names and its deployment; 400 without one, 404 for one the
        caller may not use (as for one that does not exist)."""
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise invalid_request("You must provide a model parameter.", param="model")
        dep = self.router.resolve(model)
        if dep is None or not key.allows(dep.name, model):
            raise model_not_found(model)
        return model, dep

    def _fallback_chain(self, key: Principal, action: str, dep: Deployment) -> list[Deployment]:
        """`dep`, then the fallbacks (and theirs) this caller may use: like the model asked for,
        each must be on the key's model list and allow `action` on one of its names. The others
        are skipped, so a failure of `dep` never serves the caller from a model it may not use."""
        return [
            d for d in self.router.chain(dep) if d is dep or key.can_use_model(action, d.name, *d.aliases)
        ]

    def _limits(self, key: Principal, dep: Deployment) -> tuple[Limit, ...]:
        """The caller's limits, then the deployment's own (`model:` scope), if it has any."""
        limits = key_limits(key, self.settings.gateway.ratelimit)
        if (model_limit := self.model_limits.get(dep.name)) is not None:
            limits = (*limits, model_limit)
        return limits

    def _cost(self, path: str, body: bytes, data: dict[str, Any]) -> tuple[int, int]:
        """(tokens, images) a request is charged before the call; 400 for a bad `max_tokens`/`n`.
        Images count against image budgets, not tokens; embeddings reserve their input only."""
        if path in (IMAGES_PATH, EDITS_PATH):
            return 0, image_count(data)
        most = self.settings.gateway.ratelimit.default_max_tokens
        return reserve_tokens(len(body), data, most, embeddings=path == EMBEDDINGS_PATH), 0

    async def forward(
        self, request: Request, path: str, trace: Phases = UNTRACED
    ) -> Response | Buffered | UpstreamStream:
        """Handles a POST to `path`, one of PROXIED_PATHS; the caller sends the response (and
        ends `trace`, whose phases are stepped through here)."""
        tracker = RequestTracker(time.monotonic())
        result: Buffered | UpstreamStream | None = None
        status = 500
        try:
            trace.step("auth")
            key = await self.auth.authenticate(request.headers)
            request.scope[PRINCIPAL] = key  # for the meter
            trace.step("routing")
            body = await read_body(request.receive, self.max_body, request.scope)
            form = request.headers.get("content-type", "") if path == EDITS_PATH else None
            data = parse_json_body(body) if form is None else form_fields(body, form)
            model, dep = self._deployment(key, data)
            tracker.model = dep.name
            request.scope[MODEL] = dep.name
            action = ENDPOINT_ACTIONS[path]
            require_model(key, action, model, dep.name, model)
            stream = stream_flag(data)
            # A form goes as it came: no fallback model, no alias renamed (model servers know aliases).
            chain = [dep] if not dep.fallbacks or form else self._fallback_chain(key, action, dep)
            limits = self._limits(key, dep)
            cost = self._cost(path, body, data) if limits or len(chain) > 1 else (0, 0)
            urls = path in (IMAGES_PATH, EDITS_PATH) and ask_for_b64(data, stream)  # answered with URLs
            if form is None and (model != dep.name or urls):  # an alias: upstream knows the model's name
                data["model"] = dep.name
                body = dump_body(data)
            trace.step("limits" if limits else None)
            # Nothing may fail between acquiring and `send`, which releases the ticket from then on.
            ticket = await self.limiter.acquire(limits, *cost) if limits else None
            # The proxy ends this phase when no cache answered.
            trace.step("cache" if self.forwarder.cache is not None else None)
            out = Outgoing(request, chain, PROXIED_PATHS[path], data, body, tracker, key, stream, cost, form)
            result = await self.forwarder.send(out, ticket)
            if urls:
                trace.step("images.store")
                result = await self.images.to_urls(result, request, data)
            trace.step(None)
            status = result.status_code
            return result
        except (RateLimited, LimiterUnavailable, APIError) as exc:
            response = _refusal(exc)
            status = response.status_code
            return response
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            status = CLIENT_CLOSED
            return Buffered(CLIENT_CLOSED, b"", [])
        finally:
            if not isinstance(result, UpstreamStream):  # a stream is counted when it ends
                tracker.done(status, time.monotonic())


def _refusal(exc: RateLimited | LimiterUnavailable | APIError) -> Response:
    """The answer to a request refused before any upstream was called."""
    if isinstance(exc, RateLimited):
        # type = code = "insufficient_quota" for a spent budget, as OpenAI sends it.
        kind = exc.code if exc.code == "insufficient_quota" else None
        return APIError(429, exc.message(), type=kind, code=exc.code, headers=exc.headers()).to_response()
    if isinstance(exc, LimiterUnavailable):
        message = "Rate limits cannot be checked right now; retry shortly."
        return APIError(
            503, message, code="rate_limiter_unavailable", headers={"Retry-After": "1"}
        ).to_response()
    return exc.to_response()


async def read_body(receive: Receive, limit: int, scope: Scope) -> bytes:
    """The whole request body (usually one message); ClientDisconnect if the client left first.
    413 once it is known to exceed `limit` bytes: declared so, or that much received (chunked);
    nothing further is read (uvicorn drops the rest of an unread body)."""
    message = await receive()
    if message["type"] != "http.request":
        raise ClientDisconnect()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: checked without a header lookup
        if len(body) > limit:
            raise body_too_large(limit)
        return body
    if declared_length(scope) > limit:
        raise body_too_large(limit)
    chunks, size = [body], len(body)
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            if size > limit:
                break
            return b"".join(chunks)
    raise body_too_large(limit)


class Proxied:
    """The ASGI endpoint of one proxied path: `Gateway.forward`, then the response, metered,
    with the request's `x-request-id`; traced when tracing is on (its span ends with the
    response, a stream's included)."""

    def __init__(self, gateway: Gateway, path: str) -> None:
        self.gateway = gateway
        self.path = path
        self.endpoint = ENDPOINT_ACTIONS[path].split(":")[1]  # "chat", "embeddings"...

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.monotonic()
        gw = self.gateway
        outer = current_request()  # set already when Starlette's middleware ran first (`_routed`)
        req = begin_request(
            scope["headers"], gw.tracing, "POST", self.path, outer.request_id if outer is not None else None
        )
        token = enter_request(req)
        try:
            response = await gw.forward(Request(scope, receive), self.path, req.trace or UNTRACED)
        except Exception as exc:  # as Starlette's exception handlers would, before any byte
            response = _failure(exc, self.path)
        stamp_request_id(response.raw_headers, req.request_id)
        try:
            await metered(response, gw.meter, scope, self.endpoint, start)(scope, receive, send)
        finally:
            after = response.after if isinstance(response, Buffered) else None
            if after is not None:
                try:
                    await after()
                except Exception as exc:  # the client has its answer; only log
                    log.error("settling after the response failed", exc_info=exc)
            if req.trace is not None:
                self._end_trace(req.trace, scope, response.status_code)
            leave_request(token)

    @staticmethod
    def _end_trace(trace: RequestTrace, scope: Scope, status: int) -> None:
        model = scope.get(MODEL)
        if model is not None:
            trace.set("budrt.model", model)
        trace.end(status)


class GatewayApp(Starlette):
    """Starlette, except that POSTs to the proxied paths go straight to their endpoint.

    Starlette's middleware and router layers cost about as much CPU per request as the
    gateway's own work on the hot path; every other path goes through them as usual, and so
    does everything once middleware is added (it must see every request).
    """

    proxied: dict[str, Proxied]
    body_limit: BodyLimit  # every other route; the proxied endpoints check it in `read_body`

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST" and not scope.get("root_path"):
                endpoint = self.proxied.get(scope["path"])
                if endpoint is not None and not self.user_middleware and self.max_body_size is None:
                    scope["app"] = self
                    await endpoint(scope, receive, send)
                    return
            await self._routed(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Any other HTTP request, behind `body_limit`: its id in its log lines and answered in
        `x-request-id` (a proxied endpoint reached this way keeps that id for its trace)."""
        req = begin_request(scope["headers"], None, scope["method"], scope["path"])
        token = enter_request(req)
        try:
            await self.body_limit(scope, receive, sending_request_id(send, req.request_id))
        finally:
            leave_request(token)

    async def route(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Starlette's own handling (middleware, router), behind `body_limit`."""
        await super().__call__(scope, receive, send)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.to_response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "Method not allowed." if exc.status_code == 405 else f"Unknown path: {request.url.path}"
    if exc.status_code not in (404, 405):
        message = str(exc.detail)
    return APIError(exc.status_code, message, headers=exc.headers).to_response()


async def _failed(request: Request, exc: Exception) -> Response:
    return _failure(exc, request.url.path)


def _failure(exc: Exception, path: str) -> Response:
    """An unreachable database (admin writes with the primary down, a budget first read during
    an outage): 503, logged as a warning. Anything else: 500, logged with its traceback."""
    if is_unavailable(exc):
        log.warning("database unavailable", extra={"fields": {"path": path, "error": str(exc)}})
        return database_unavailable().to_response()
    log.error("unhandled error", exc_info=exc, extra={"fields": {"path": path}})
    return internal_error().to_response()


def create_app(
    settings: Settings, *, key_store: KeyStore | None = None, tracing: Tracing | None = None
) -> Starlette:
    """The gateway app. The database must already be migrated (`budrt.store.db.migrate`).
    `tracing`: this process's (`observe.tracing.setup_tracing`), when tracing is on."""
    store = key_store or KeyStore.from_settings(settings)
    gw = Gateway(settings, store, tracing)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        session = await gw.proxy.start()
        checker = asyncio.create_task(gw.health.run(session))
        retention = asyncio.create_task(gw.images.keep_retention())
        warm_up = asyncio.create_task(gw.auth.warm_up())
        if gw.meter is not None:
            await gw.meter.start()  # replays the usage spool a crash left behind
        try:
            yield
        finally:
            for task in (checker, retention, warm_up):
                task.cancel()
            await asyncio.gather(checker, retention, warm_up, return_exceptions=True)
            await gw.proxy.close()
            if gw.meter is not None:
                await gw.meter.close()  # after in-flight requests ended: their records included
            await gw.close_clients()
            if key_store is None:
                store.db.dispose()

    proxied = {path: Proxied(gw, path) for path in PROXIED_PATHS}
    routes = [
        Route("/health/live", gw.live, methods=["GET"]),
        Route("/health/ready", gw.ready, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        Route("/v1/models", gw.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.get_model, methods=["GET"]),
        Route("/v1/images/files/{name}", gw.images.serve, methods=["GET"]),  # signed URL, no API key
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in proxied.items()),
        *gw.admin.routes(),
        *([gw.console.mount()] if gw.console is not None else []),
    ]
    app = GatewayApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            APIError: _api_error,
            ClientDisconnect: client_left,
            HTTPException: _http_error,
            # Handled here, not re-raised as an `Exception` handler's is: an outage is no crash.
            DBAPIError: _failed,
            Exception: _failed,
        },
    )
    app.proxied = proxied
    app.body_limit = BodyLimit(app.route, settings.gateway.max_body_bytes)
    app.state.gateway = gw
    return app
