"""The gateway ASGI app: auth, routing and proxying of the OpenAI API to model servers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from budrt.config import Settings
from budrt.gateway.admin import AdminAPI
from budrt.gateway.auth import Authenticator, require_model
from budrt.gateway.health import HealthChecker
from budrt.gateway.jwt_auth import JWTVerifier
from budrt.gateway.metering import MODEL, PRINCIPAL, Meter, metered
from budrt.gateway.metrics import RequestTracker
from budrt.gateway.proxy import CLIENT_CLOSED, Proxy, UpstreamStream
from budrt.gateway.ratelimit import LimiterUnavailable, RateLimited
from budrt.gateway.routing import Router
from budrt.gateway.traffic import Traffic, key_limits, make_limiter, reserve_tokens
from budrt.observe.metrics import metrics_endpoint
from budrt.protocol.errors import APIError, internal_error, invalid_request, model_not_found, parse_json_body
from budrt.security.rbac import ENDPOINT_ACTIONS
from budrt.store.identity import IdentityStore
from budrt.store.keys import KeyStore
from budrt.store.usage import UsageStore

log = logging.getLogger("budrt.gateway")

# Client path -> path appended to an endpoint's base URL (which ends in /v1).
PROXIED_PATHS = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/completions": "/completions",
    "/v1/embeddings": "/embeddings",
    "/v1/images/generations": "/images/generations",
}


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class Gateway:
    def __init__(self, settings: Settings, store: KeyStore) -> None:
        self.settings = settings
        self.store = store
        self.router = Router(settings.deployments, settings.gateway)
        self.identity = IdentityStore(store.engine)
        self.jwt = JWTVerifier(settings.auth.jwt) if settings.auth.jwt.enabled else None
        self.auth = Authenticator(store, settings.auth.cache_ttl_s, identity=self.identity, jwt=self.jwt)
        self.usage = UsageStore(store.engine)
        self.meter = Meter(self.usage, settings.metering) if settings.metering.enabled else None
        self.admin = AdminAPI(self.auth, store, self.identity, self.usage, self.meter)
        self.limiter = make_limiter(settings.gateway)
        self.proxy = Proxy(settings.gateway)
        self.traffic = Traffic(settings.gateway, self.router, self.proxy, self.limiter)
        self.health = HealthChecker(self.router, settings.gateway.health_interval_s)
        self.created = int(time.time())

    async def live(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        waiting = [d.name for d in self.router.deployments if not d.is_ready()]
        if not waiting:
            return _json({"status": "ready"})
        raise APIError(
            503,
            "Waiting for model servers: " + ", ".join(waiting),
            code="not_ready",
            headers={"Retry-After": "1"},
        )

    def _model_object(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "budrt"}

    async def list_models(self, request: Request) -> Response:
        key = await self.auth.authenticate(request.headers)
        deps = self.router.deployments
        data = [
            self._model_object(d.name) for d in deps if key.can_use_model("models:list", d.name, *d.aliases)
        ]
        return _json({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        key = await self.auth.authenticate(request.headers)
        model = request.path_params["model"]
        dep = self.router.resolve(model)
        if dep is None or not key.can_use_model("models:list", dep.name, model):
            raise model_not_found(model)
        return _json(self._model_object(model))

    async def forward(self, request: Request) -> Response | UpstreamStream:
        tracker = RequestTracker(time.monotonic())
        result: Response | UpstreamStream | None = None
        status = 500
        try:
            key = await self.auth.authenticate(request.headers)
            request.scope[PRINCIPAL] = key  # for the meter
            body = await request.body()
            data = parse_json_body(body)
            model = data.get("model")
            if not isinstance(model, str) or not model:
                raise invalid_request("You must provide a model parameter.", param="model")
            dep = self.router.resolve(model)
            if dep is None or not key.allows(dep.name, model):
                raise model_not_found(model)
            tracker.model = dep.name
            request.scope[MODEL] = dep.name
            require_model(key, ENDPOINT_ACTIONS[request.url.path], model, dep.name, model)
            limits = key_limits(key, self.settings.gateway.ratelimit)
            ticket = None
            if limits:
                reserve = reserve_tokens(len(body), data, self.settings.gateway.ratelimit.default_max_tokens)
                ticket = await self.limiter.acquire(limits, reserve)
            if model != dep.name:  # an alias: upstream only knows the canonical name
                data["model"] = dep.name
                body = orjson.dumps(data)
            upstream_path = PROXIED_PATHS[request.url.path]
            result = await self.traffic.send(
                request.receive, request.headers, dep, upstream_path, data, body, tracker, ticket
            )
            status = result.status_code
            return result
        except RateLimited as exc:
            status = 429
            return APIError(
                429, exc.message(), code="rate_limit_exceeded", headers=exc.headers()
            ).to_response()
        except LimiterUnavailable:
            status = 503
            message = "Rate limits cannot be checked right now; retry shortly."
            return APIError(
                503, message, code="rate_limiter_unavailable", headers={"Retry-After": "1"}
            ).to_response()
        except APIError as exc:
            status = exc.status
            return exc.to_response()
        except ClientDisconnect:  # gone while sending the body: nobody to answer
            status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        finally:
            if not isinstance(result, UpstreamStream):  # a stream is counted when it ends
                tracker.done(status, time.monotonic())


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.to_response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "Method not allowed." if exc.status_code == 405 else f"Unknown path: {request.url.path}"
    if exc.status_code not in (404, 405):
        message = str(exc.detail)
    return APIError(exc.status_code, message, headers=exc.headers).to_response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"fields": {"path": request.url.path}})
    return internal_error().to_response()


def create_app(settings: Settings, *, key_store: KeyStore | None = None) -> Starlette:
    """The gateway app. The database must already be migrated (`budrt.store.db.migrate`)."""
    store = key_store or KeyStore.from_settings(settings)
    gw = Gateway(settings, store)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        session = await gw.proxy.start()
        checker = asyncio.create_task(gw.health.run(session))
        if gw.meter is not None:
            gw.meter.start()
        try:
            yield
        finally:
            checker.cancel()
            await asyncio.gather(checker, return_exceptions=True)
            await gw.proxy.close()
            if gw.meter is not None:
                await gw.meter.close()  # after in-flight requests ended: their records included
            if gw.jwt is not None:
                await gw.jwt.close()
            await gw.traffic.close()
            if key_store is None:
                store.engine.dispose()

    routes = [
        Route("/health/live", gw.live, methods=["GET"]),
        Route("/health/ready", gw.ready, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/models", gw.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.get_model, methods=["GET"]),
        *(
            Route(path, metered(gw.forward, gw.meter, ENDPOINT_ACTIONS[path].split(":")[1]), methods=["POST"])
            for path in PROXIED_PATHS
        ),
        *gw.admin.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _unexpected},
    )
    app.state.gateway = gw
    return app
