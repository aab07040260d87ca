"""An admin's control of this server's models: `POST /admin/models/{model}/load|unload|pin`.

The gateway calls these for `POST /admin/replicas/models/{model}/...` (gateway/model_admin.py),
which is where callers are authenticated and authorized (`models:manage`). Here they are behind
the same guard as every other route of the model server (app.py `RequireInternalKey`: the run's
internal credential; with TLS, a client certificate from the platform's CA too), so only the
gateway and the supervisor's side reach them. Every answer is the model's card (as
`GET /v1/models/{model}` shows it) or an OpenAI-style error.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from budrt.protocol.errors import APIError, invalid_request, model_not_found, parse_json_body
from budrt.server.model_pool import HostedModel, ModelPool

# How long a load request waits for the load to have its room: long enough to refuse a model
# that does not fit (pinned models in the way) with a clear error, short enough that a load
# fetching a large artifact answers 202 and goes on.
PLACEMENT_WAIT_S = 5.0


def model_card(hosted: HostedModel) -> dict[str, object]:
    """A model as `GET /v1/models` and the admin routes show it."""
    in_memory = hosted.state in ("ready", "loading")
    engine = hosted.stepping_engine
    stats = engine.stats() if engine is not None else {}
    return {
        "id": hosted.name,
        "object": "model",
        "created": hosted.created,
        "owned_by": "budrt",
        "task": hosted.config.task,
        "state": hosted.shown_state,
        "memory_bytes": hosted.cost_bytes if in_memory else None,
        "device": hosted.device if in_memory else None,
        "pinned": hosted.pinned,
        "error": hosted.error,
        "loads": hosted.loads,
        "in_flight": hosted.in_flight,
        # The text engine's batch: running and waiting sequences, share of the KV cache in use.
        "running": stats.get("running"),
        "waiting": stats.get("waiting"),
        "kv_cache_usage": stats.get("kv_usage"),
        "max_model_len": hosted.config.max_model_len,
        "aliases": hosted.config.aliases,
    }


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _hosted(request: Request) -> tuple[ModelPool, HostedModel]:
    pool: ModelPool = request.app.state.pool
    name = request.path_params["model"]
    hosted = pool.get(name)
    if hosted is None:
        raise model_not_found(name)
    return pool, hosted


async def load_model(request: Request) -> Response:
    """Start loading the model: 202 while it loads, 200 once resident (or when it was already).
    A model that can never fit is 507 `model_too_large`; one whose room only the eviction of
    pinned models could make is 409 `pinned_model_in_the_way` (the message names them; they are
    never evicted for it); any other failed load is 503 `model_unavailable`."""
    pool, hosted = _hosted(request)
    await pool.start_load(hosted, PLACEMENT_WAIT_S)
    if hosted.state == "failed":
        raise _load_failure(hosted)
    return _json(model_card(hosted), status=200 if hosted.state == "ready" else 202)


def _load_failure(hosted: HostedModel) -> APIError:
    message = f"The model `{hosted.name}` cannot be loaded: {hosted.error}"
    if hosted.too_large:
        return APIError(507, message, param="model", code="model_too_large")
    if hosted.held_by:
        return APIError(409, message, param="model", code="pinned_model_in_the_way")
    return APIError(503, message, code="model_unavailable")


async def unload_model(request: Request) -> Response:
    """Evict the model now (200, state `available`; also when it was not resident). Refused with
    409 rather than waited for while it serves requests (`model_busy`), loads (`model_loading`)
    or is pinned (`model_pinned`): see `ModelPool.unload`. Its next request loads it again."""
    pool, hosted = _hosted(request)
    await pool.unload(hosted)
    return _json(model_card(hosted))


async def pin_model(request: Request) -> Response:
    """`{"pinned": true}`: never evicted to make room for another model (a load needing its room
    fails instead); `false`: evictable again, least recently used first. Lasts until this process
    ends; the model's `pinned` setting is the lasting form. A model need not be resident to be
    pinned: it then stays once loaded."""
    pool, hosted = _hosted(request)
    pinned = parse_pin(parse_json_body(await request.body()))
    pool.set_pinned(hosted, pinned)
    return _json(model_card(hosted))


def parse_pin(data: dict[str, object]) -> bool:
    """The body of a pin request: exactly `{"pinned": <boolean>}` (a 400 names what is wrong)."""
    for name in data:
        if name != "pinned":
            raise invalid_request(
                f"Unknown field '{name[:100]}'; the body is {{\"pinned\": true|false}}.", param=name[:100]
            )
    pinned = data.get("pinned")
    if not isinstance(pinned, bool):
        raise invalid_request("'pinned' must be true or false.", param="pinned")
    return pinned
