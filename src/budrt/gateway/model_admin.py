"""Loading, unloading and pinning a model on the model servers that host it, through the gateway.

`POST /admin/replicas/models/{model}/load`, `.../unload` and `.../pin` (body `{"pinned": bool}`)
call `POST /admin/models/{model}/<action>` (server/admin_routes.py) on every replica of the model,
or on the one named by `replica` (a query parameter or a body field: its URL as
`GET /admin/replicas` lists it). Only budrt's own model servers are called: a deployment's managed
endpoints (the supervisor's) and replicas registered by heartbeat; a configured external upstream
has no such API. They are called the way requests are proxied to them: with the proxy's client
(with TLS, the platform's client certificate) and the endpoint's own headers (the internal
credential; the Host of a pinned address).

Callers need `models:manage` on `model:<name>`. Once the replicas were asked the answer is 200 and
lists what each one said: a replica that refuses, fails or does not answer within CALL_TIMEOUT_S
is one entry of the list, never a 5xx of the gateway. Every action is audited (actor,
`models:<action>`, `model:<name>`, each replica's status).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from yarl import URL

from budrt.gateway.auth import Authenticator, require
from budrt.gateway.replicas import normalize_url
from budrt.gateway.routing import Deployment, Endpoint
from budrt.protocol.errors import APIError, invalid_request, model_not_found, parse_json_body
from budrt.security.rbac import MODELS_MANAGE, Principal
from budrt.store.identity import IdentityStore

log = logging.getLogger("budrt.gateway.model_admin")

ACTIONS = ("load", "unload", "pin")
# A load answers once it has its room (server/admin_routes.py PLACEMENT_WAIT_S), the others at once.
CALL_TIMEOUT_S = 30.0
MAX_REPLY_BYTES = 64 * 1024  # a model card or an error; more is not a model server's answer
REFUSED_CREDENTIAL = frozenset({401, 407})  # the replica refused the gateway's own credential


@dataclass(frozen=True, slots=True)
class Order:
    """One admin action, as its request asked for it."""

    action: str  # one of ACTIONS
    replica: str | None  # a replica's base URL; None: every replica of the model
    pinned: bool | None = None  # for "pin"


def parse_order(action: str, data: dict[str, Any], query_replica: str | None) -> Order:
    """The action's body (may be empty, except for `pin`) and `?replica=`; a 400 names the param."""
    allowed = ("replica", "pinned") if action == "pin" else ("replica",)
    for name in data:
        if name not in allowed:
            fields = " and ".join(f"'{a}'" for a in allowed)
            raise invalid_request(
                f"Unknown field '{name[:100]}'; the body may hold {fields}.", param=name[:100]
            )
    replica = None
    for given in (query_replica, data.get("replica")):
        if given is None:
            continue
        url = normalize_url(given, "replica")
        if replica is not None and url != replica:
            raise invalid_request("The query and the body name different replicas.", param="replica")
        replica = url
    pinned = data.get("pinned")
    if action == "pin" and not isinstance(pinned, bool):
        raise invalid_request("'pinned' must be true or false.", param="pinned")
    return Order(action, replica, pinned)


def targets(dep: Deployment, replica: str | None, now: float) -> list[Endpoint]:
    """The budrt model servers of `dep` to call (all, or the one at `replica`); 404 when none."""
    hosts = [e for e in dep.endpoints if (e.managed or e.registered) and e.expires > now]
    if replica is not None:
        hosts = [e for e in hosts if e.base_url == replica]
        if not hosts:
            raise APIError(
                404,
                f"No budrt model server at {replica} hosts the model `{dep.name}`.",
                param="replica",
                code="replica_not_found",
            )
    elif not hosts:
        raise APIError(
            404,
            f"No budrt model server hosts the model `{dep.name}` (external upstreams cannot be managed).",
            param="model",
            code="replica_not_found",
        )
    return hosts


def _error(message: str, code: str) -> dict[str, Any]:
    return APIError(502, message, code=code).body()["error"]


async def call_replica(
    session: aiohttp.ClientSession, ep: Endpoint, model: str, order: Order
) -> dict[str, Any]:
    """What one replica said to the action: a row of the answer, never an exception."""
    row: dict[str, Any] = {"replica": ep.base_url, "zone": ep.zone, "ok": False, "status": None}
    root = ep.connect_url.removesuffix("/v1")
    body = orjson.dumps({"pinned": order.pinned}) if order.action == "pin" else b""
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    try:
        # Quoted whole ('/' too): the name arrives as one path parameter, whatever it holds.
        url = URL(f"{root}/admin/models/{quote(model, safe='')}/{order.action}", encoded=True)
        async with session.post(url, data=body, headers=ep.headers, timeout=timeout) as resp:
            row["status"] = resp.status
            raw = await resp.content.read(MAX_REPLY_BYTES + 1)
    except TimeoutError:
        return {
            **row,
            "model": None,
            "error": _error(f"No answer within {CALL_TIMEOUT_S:g} s.", "replica_timeout"),
        }
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        problem = f"The replica could not be reached: {type(exc).__name__}: {exc}"[:500]
        return {**row, "model": None, "error": _error(problem, "replica_unreachable")}
    return _outcome(row, raw, ep)


def _outcome(row: dict[str, Any], raw: bytes, ep: Endpoint) -> dict[str, Any]:
    """The row for a replica that answered: its model card, or its error."""
    status: int = row["status"]
    if status in REFUSED_CREDENTIAL:  # its body may quote the credential it refused: not relayed
        message = f"The replica refused the gateway's credential (HTTP {status})."
        return {**row, "model": None, "error": _error(message, "upstream_auth_failed")}
    try:
        data = orjson.loads(raw) if len(raw) <= MAX_REPLY_BYTES else None
    except orjson.JSONDecodeError:
        data = None
    if 200 <= status < 300 and isinstance(data, dict):
        # /admin/replicas shows the change now, not at the replica's next heartbeat.
        if isinstance(data.get("state"), str):
            ep.model_state = data["state"]
        if isinstance(data.get("pinned"), bool):
            ep.pinned = data["pinned"]
        return {**row, "ok": True, "model": data, "error": None}
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        error = _error(f"The replica answered HTTP {status} without an OpenAI-style error.", "upstream_error")
    return {**row, "model": None, "error": error}


def _actor(p: Principal) -> str:
    return f"key:{p.key_id}" if p.kind == "key" else f"jwt:{p.user}"


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class ModelAdminAPI:
    """The routes; the router and the proxy's client are the gateway's (`app.state.gateway`)."""

    def __init__(self, auth: Authenticator, identity: IdentityStore) -> None:
        self.auth = auth
        self.identity = identity

    def routes(self) -> list[Route]:
        return [
            Route("/admin/replicas/models/{model:path}/load", self.load, methods=["POST"]),
            Route("/admin/replicas/models/{model:path}/unload", self.unload, methods=["POST"]),
            Route("/admin/replicas/models/{model:path}/pin", self.pin, methods=["POST"]),
        ]

    async def load(self, request: Request) -> Response:
        """Start loading the model (each replica answers 202 while it loads, 200 once resident)."""
        return await self._act(request, "load")

    async def unload(self, request: Request) -> Response:
        """Evict the model (a replica answers 409 while it serves requests, loads or is pinned)."""
        return await self._act(request, "unload")

    async def pin(self, request: Request) -> Response:
        """`{"pinned": true|false}`: a pinned model is never evicted to make room for another."""
        return await self._act(request, "pin")

    async def _act(self, request: Request, action: str) -> Response:
        p = await self.auth.authenticate(request.headers)
        if not p.may(MODELS_MANAGE):  # 403 before telling whether the model exists
            require(p, MODELS_MANAGE, "model:*")
        raw = await request.body()
        data = parse_json_body(raw) if raw.strip() else {}
        order = parse_order(action, data, request.query_params.get("replica"))
        gateway = request.app.state.gateway
        name = request.path_params["model"]
        dep = gateway.router.resolve(name)
        if dep is None or not p.allows(dep.name, name):
            raise model_not_found(name)
        require(p, MODELS_MANAGE, f"model:{dep.name}")
        hosts = targets(dep, order.replica, time.monotonic())
        session = gateway.proxy.session
        if session is None:  # only before the app's start-up finished
            raise APIError(503, "The gateway is starting; retry shortly.", headers={"Retry-After": "1"})
        rows = await asyncio.gather(*(call_replica(session, ep, dep.name, order) for ep in hosts))
        await self._audit(p, order, dep.name, rows)
        body: dict[str, Any] = {"object": "model_action", "model": dep.name, "action": action}
        if order.pinned is not None:
            body["pinned"] = order.pinned
        body.update({"ok": all(r["ok"] for r in rows), "replicas": rows})
        return _json(body)

    async def _audit(self, p: Principal, order: Order, model: str, rows: list[dict[str, Any]]) -> None:
        """Every action that reached the replicas, with what each answered (None: no answer)."""
        detail: dict[str, Any] = {"replicas": {r["replica"]: r["status"] for r in rows}}
        if order.pinned is not None:
            detail["pinned"] = order.pinned
        try:
            await run_in_threadpool(
                self.identity.record, _actor(p), f"models:{order.action}", f"model:{model}", detail
            )
        except Exception:  # the replicas have acted already; a lost audit line is logged, not fatal
            log.exception("audit write failed", extra={"fields": {"model": model, "action": order.action}})
