"""The model server: one process hosting one or more models behind the OpenAI HTTP API.

It speaks the same API as any external upstream (vLLM, llama.cpp server), so the gateway
treats budrt's own servers and external ones alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from budrt.config import ModelConfig, ModelServerConfig
from budrt.observe.metrics import metrics_endpoint
from budrt.observe.tracing import Tracing, begin_request, enter_request, leave_request, sending_request_id
from budrt.protocol.body_limit import BodyLimit
from budrt.protocol.errors import APIError, client_left, internal_error, model_not_found, unauthorized
from budrt.security.certs import CertPaths
from budrt.server.admin_routes import load_model, model_card, pin_model, unload_model
from budrt.server.embed_routes import embeddings
from budrt.server.heartbeat import Heartbeat
from budrt.server.image_routes import image_edits, image_generations
from budrt.server.metrics import register_engine_collector
from budrt.server.model_pool import HostedModel, ModelPool, Resolver
from budrt.server.residency import server_budgets
from budrt.server.text_routes import chat_completions, completions
from budrt.server.watchdog import Watchdog

log = logging.getLogger(__name__)


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def live(request: Request) -> Response:
    """Liveness: the process answers and its watchdog saw no stuck engine or failed self-test."""
    watchdog: Watchdog = request.app.state.watchdog
    if watchdog.healthy:
        return _json({"status": "ok"})
    return _json({"status": "unhealthy", "error": watchdog.error}, status=503)


async def ready(request: Request) -> Response:
    """Readiness of the server (`?model=NAME`: of one model), with what the supervisor reports."""
    pool: ModelPool = request.app.state.pool
    watchdog: Watchdog = request.app.state.watchdog
    body = {
        "healthy": watchdog.healthy,
        "error": watchdog.error,
        "last_error": watchdog.last_error,
        "models": {name: m.state for name, m in pool.models.items()},
        "resident": [_residency(m) for m in pool.models.values() if m.state in ("ready", "loading")],
        "budget": [  # one per device
            {"device": b.device, "total_bytes": b.total_bytes, "used_bytes": pool.used_bytes(b.device)}
            for b in pool.budgets
        ],
    }
    model = request.query_params.get("model")
    if model is not None:
        hosted = pool.get(model)
        if hosted is None:
            raise model_not_found(model)
        ok = hosted.state == "ready" and watchdog.healthy
    else:
        ok = pool.ready() and watchdog.healthy
    return _json({"status": "ready" if ok else "not_ready", **body}, status=200 if ok else 503)


def _residency(hosted: HostedModel) -> dict[str, object]:
    return {
        "name": hosted.name,
        "state": hosted.state,
        "memory_bytes": hosted.cost_bytes,
        "device": hosted.device,
        "in_flight": hosted.in_flight,
        "pinned": hosted.pinned,
        # A text model's dtype and CPU kernel level, and why (engine/kernels.py `describe`).
        "runtime": hosted.engine.runtime if hosted.engine is not None else None,
    }


async def list_models(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    return _json({"object": "list", "data": [model_card(m) for m in pool.models.values()]})


async def get_model(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    hosted = pool.get(request.path_params["model"])
    if hosted is None:
        raise model_not_found(request.path_params["model"])
    return _json(model_card(hosted))


class _Held(Response):
    """Runs the response, then lets go of the model the request held (streams included)."""

    def __init__(self, inner: Response, release: Callable[[], None]) -> None:
        self.inner, self.release = inner, release
        self.status_code, self.raw_headers, self.background = inner.status_code, inner.raw_headers, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.release()


def holding_model(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Routes call `serving_model`, which holds a model on `request.state`; release it at the end."""

    def release(request: Request) -> None:
        hosted = getattr(request.state, "hosted", None)
        if hosted is not None:
            request.state.hosted = None
            request.app.state.pool.release(hosted)

    async def wrapper(request: Request) -> Response:
        try:
            response = await endpoint(request)
        except BaseException:
            release(request)
            raise
        return _Held(response, lambda: release(request))

    return wrapper


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.to_response()


async def handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return APIError(404, f"Unknown path {request.url.path}.", code="not_found").to_response()
    if exc.status_code == 405:
        return APIError(
            405,
            f"Method {request.method} is not allowed here.",
            type="invalid_request_error",
            code="method_not_allowed",
        ).to_response()
    return APIError(exc.status_code, str(exc.detail)).to_response()


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return internal_error().to_response()


PUBLIC_PATHS = frozenset({"/health/live"})  # liveness: says nothing but "this process answers"


class RequireInternalKey:
    """Every route but `PUBLIC_PATHS` needs `Authorization: Bearer <internal key>`: whoever
    reaches the port must not skip the gateway's keys, limits and metering, or load, unload
    and pin models (`/admin/models/...`, which only the gateway calls)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS and not self._allowed(scope):
            error = unauthorized("Missing or invalid internal credential; call the gateway instead.")
            await error.to_response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)


TRACED_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/images/generations",
        "/v1/images/edits",
    }
)


class RequestContext:
    """Every request's id (the gateway's `x-request-id`, else a new one) in its log lines and its
    answer; with tracing on, a span for each POST of the API, continuing the trace of the
    `traceparent` it came with. The span ends when the response has been sent (streams too)."""

    def __init__(self, app: ASGIApp, tracing: Tracing | None) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        tracing = self.tracing if method == "POST" and path in TRACED_PATHS else None
        req = begin_request(scope["headers"], tracing, method, path)
        status = 500  # unless a response starts: the app raised

        def started(code: int) -> None:
            nonlocal status
            status = code

        token = enter_request(req)
        try:
            await self.app(scope, receive, sending_request_id(send, req.request_id, started))
        finally:
            if req.trace is not None:
                req.trace.end(status)
            leave_request(token)


def create_server_app(
    server: ModelServerConfig,
    models: list[ModelConfig],
    preload: list[str] | None = None,
    resolver: Resolver | None = None,
    dequantized_dir: Path | None = None,
    internal_key: str | None = None,
    tls: CertPaths | None = None,
    zone: str | None = None,
    tracing: Tracing | None = None,
) -> Starlette:
    """`preload`: models to load at start besides those marked so (the supervisor passes the
    models a server held before it was restarted). `internal_key`: required from callers.
    `tls`: the platform's certificates when this server serves HTTPS (its heartbeat then too).
    `tracing`: this process's (`observe.tracing.setup_tracing`), when tracing is on."""
    pool = ModelPool(
        [m for m in models if m.name in server.models],
        server_budgets(server),
        server.load_timeout_s,
        resolver,
        dequantized_dir,
    )
    watchdog = Watchdog(
        pool,
        interval_s=server.watchdog_interval_s,
        step_timeout_s=server.step_timeout_s,
        self_test_interval_s=server.self_test_interval_s,
    )
    heartbeat = Heartbeat(server, pool, internal_key, tls, zone)  # registration with gateways, if configured
    # The credential first: a caller without it gets nothing read, not even its body's length.
    middleware = [Middleware(RequireInternalKey, key=internal_key)] if internal_key else []
    middleware.append(Middleware(RequestContext, tracing=tracing))
    middleware.append(Middleware(BodyLimit, max_bytes=server.max_body_bytes))
    app = Starlette(
        routes=ROUTES,
        middleware=middleware,
        lifespan=partial(_background, pool, watchdog, heartbeat, preload),
        exception_handlers={
            APIError: handle_api_error,
            ClientDisconnect: client_left,
            HTTPException: handle_http_error,
            Exception: handle_unexpected,
        },
    )
    app.state.pool = pool
    app.state.watchdog = watchdog
    app.state.max_n = server.max_n
    register_engine_collector(pool)
    return app


ROUTES = [
    Route("/health/live", live),
    Route("/health/ready", ready),
    Route("/metrics", metrics_endpoint),
    Route("/v1/models", list_models),
    Route("/v1/models/{model:path}", get_model),
    Route("/v1/chat/completions", holding_model(chat_completions), methods=["POST"]),
    Route("/v1/completions", holding_model(completions), methods=["POST"]),
    Route("/v1/embeddings", holding_model(embeddings), methods=["POST"]),
    Route("/v1/images/generations", holding_model(image_generations), methods=["POST"]),
    Route("/v1/images/edits", holding_model(image_edits), methods=["POST"]),
    # An admin's, through the gateway (server/admin_routes.py); behind the internal credential.
    Route("/admin/models/{model:path}/load", load_model, methods=["POST"]),
    Route("/admin/models/{model:path}/unload", unload_model, methods=["POST"]),
    Route("/admin/models/{model:path}/pin", pin_model, methods=["POST"]),
]


@contextlib.asynccontextmanager
async def _background(
    pool: ModelPool, watchdog: Watchdog, heartbeat: Heartbeat, preload: list[str] | None, app: Starlette
) -> AsyncIterator[None]:
    """The server's lifespan: preloading, the watchdog and the heartbeat run while it serves."""
    tasks = [asyncio.create_task(pool.preload(preload)), asyncio.create_task(watchdog.run())]
    tasks.append(asyncio.create_task(heartbeat.run()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await heartbeat.close()  # deregister before the models go away
        await pool.close()
