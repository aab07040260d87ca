"""The model server: one process hosting one or more models behind the OpenAI HTTP API.

It speaks the same API as any external upstream (vLLM, llama.cpp server), so the gateway
treats budrt's own servers and external ones alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from budrt.config import ModelConfig, ModelServerConfig
from budrt.observe.metrics import metrics_endpoint
from budrt.protocol.errors import APIError, internal_error, model_not_found
from budrt.server.embed_routes import embeddings
from budrt.server.metrics import register_engine_collector
from budrt.server.registry import ModelRegistry
from budrt.server.text_routes import chat_completions, completions

log = logging.getLogger(__name__)


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def live(request: Request) -> Response:
    return _json({"status": "ok"})


async def ready(request: Request) -> Response:
    registry: ModelRegistry = request.app.state.registry
    models = {name: m.state for name, m in registry.models.items()}
    if registry.ready():
        return _json({"status": "ready", "models": models})
    return _json({"status": "not_ready", "models": models}, status=503)


def _model_card(name: str, registry: ModelRegistry) -> dict[str, object]:
    hosted = registry.models[name]
    return {
        "id": name,
        "object": "model",
        "created": hosted.created,
        "owned_by": "budrt",
        "task": hosted.config.task,
        "state": hosted.state,
        "max_model_len": hosted.config.max_model_len,
        "aliases": hosted.config.aliases,
    }


async def list_models(request: Request) -> Response:
    registry: ModelRegistry = request.app.state.registry
    return _json({"object": "list", "data": [_model_card(n, registry) for n in registry.models]})


async def get_model(request: Request) -> Response:
    registry: ModelRegistry = request.app.state.registry
    hosted = registry.get(request.path_params["model"])
    if hosted is None:
        raise model_not_found(request.path_params["model"])
    return _json(_model_card(hosted.config.name, registry))


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


def create_server_app(server: ModelServerConfig, models: list[ModelConfig]) -> Starlette:
    registry = ModelRegistry([m for m in models if m.name in server.models])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = asyncio.create_task(registry.load_all())
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await registry.close()

    routes = [
        Route("/health/live", live),
        Route("/health/ready", ready),
        Route("/metrics", metrics_endpoint),
        Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            APIError: handle_api_error,
            HTTPException: handle_http_error,
            Exception: handle_unexpected,
        },
    )
    app.state.registry = registry
    register_engine_collector(registry)
    return app
