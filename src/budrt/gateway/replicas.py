"""Replicas that register themselves: model servers announce their models by heartbeat.

`POST /admin/replicas/heartbeat` {"url", "models": [{"id", "aliases", "state", "pinned"}], "ttl_s"}
adds the server's endpoint to each model's deployment (creating one, default strategy, for a model no
configuration names) and moves its expiry to now + ttl. The models listed are the whole set: an
endpoint for a model no longer listed is removed. A replica whose heartbeats stop is unroutable
at its expiry and taken out by the health checker's next sweep; requests already sent to it
finish. `"leaving": true` (or `DELETE /admin/replicas?url=...`) deregisters at once.

Each gateway keeps its own table: with several gateways, a server heartbeats to each of them, so
they share nothing. Registered endpoints are ordinary `Endpoint`s, so the balancer, the circuit
breaker, failover and the active health check treat them like configured ones.

What a registering key cannot do:
- join a configured deployment, unless its configuration sets `allow_registration` (409), nor add
  aliases to one (the configuration owns its names);
- receive a configured deployment's upstream `api_key`: a registered endpoint gets only the
  router's `registered_headers`;
- make the gateway send requests or health checks outside `gateway.registration_cidrs`
  (default loopback and private networks): every address the URL's host resolves to must lie
  inside (403 otherwise), checked at each heartbeat. An http URL with a host name is pinned to
  the address checked (requests go there, with the name as Host), so a DNS answer that changes
  afterwards (rebinding) cannot redirect them; for https the certificate check binds the name;
- grow the table without bound: a deployment a heartbeat created is dropped once it has had no
  replica for the last one's ttl (meanwhile its requests get 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from yarl import URL

from budrt.gateway.auth import Authenticator, require
from budrt.gateway.routing import Deployment, Endpoint, Router
from budrt.protocol.errors import APIError, invalid_request, parse_json_body
from budrt.security.rbac import REPLICAS_LIST, REPLICAS_REGISTER, Principal
from budrt.store.identity import IdentityStore

log = logging.getLogger("budrt.gateway.replicas")

DEFAULT_TTL_S = 10.0
MAX_TTL_S = 3600.0
MAX_MODELS = 256  # per heartbeat; bounds the work one request can cause
MAX_ALIASES = 32  # per model in a heartbeat, and per deployment a heartbeat created
MAX_NAME = 256
ZONE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # a Kubernetes label value, as zones are
RESOLVE_TIMEOUT_S = 5.0
LIVE_TIMEOUT_S = 2.0  # a model server's /v1/models for `GET /admin/replicas?detail=full`
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


MODEL_STATES = frozenset({"resident", "loading", "available", "failed"})  # as model servers show them


@dataclass(frozen=True, slots=True)
class Announced:
    id: str
    aliases: tuple[str, ...]
    state: str | None = None  # the model on that server (MODEL_STATES), when it says
    pinned: bool | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    url: str
    models: tuple[Announced, ...]
    ttl_s: float
    leaving: bool
    zone: str | None = None  # where the replica runs (its BUDRT_ZONE)


def parse_heartbeat(data: dict[str, Any]) -> Heartbeat:
    """Validate a heartbeat body; a 400 names the offending `param`."""
    url = normalize_url(data.get("url"))
    leaving = data.get("leaving", False)
    if not isinstance(leaving, bool):
        raise invalid_request("'leaving' must be a boolean.", param="leaving")
    ttl = data.get("ttl_s", DEFAULT_TTL_S)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL_S:
        raise invalid_request(f"'ttl_s' must be a number of seconds in (0, {MAX_TTL_S:g}].", param="ttl_s")
    zone = data.get("zone")
    if zone is not None and (not isinstance(zone, str) or not ZONE.fullmatch(zone)):
        raise invalid_request("'zone' must be up to 63 of a-z, A-Z, 0-9, '-', '_', '.'.", param="zone")
    raw = data.get("models")
    if leaving and raw is None:
        return Heartbeat(url, (), float(ttl), True, zone)
    if not isinstance(raw, list) or not raw:
        raise invalid_request(
            '\'models\' must be a non-empty list of {"id": ..., "aliases": [...]}.', param="models"
        )
    if len(raw) > MAX_MODELS:
        raise invalid_request(f"'models' may list at most {MAX_MODELS} models.", param="models")
    models: list[Announced] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if isinstance(item, str):  # shorthand: just the id
            item = {"id": item}
        if not isinstance(item, dict):
            raise invalid_request("Each model must be an object with an 'id'.", param=f"models[{i}]")
        model_id = _name(item.get("id"), f"models[{i}].id")
        aliases = item.get("aliases") or []
        if not isinstance(aliases, list) or len(aliases) > MAX_ALIASES:
            raise invalid_request(
                f"'aliases' must be a list of at most {MAX_ALIASES} strings.", param=f"models[{i}].aliases"
            )
        names = tuple(_name(a, f"models[{i}].aliases") for a in aliases)
        for name in (model_id, *names):
            if name in seen:
                raise invalid_request(f"Model name or alias {name!r} is listed twice.", param=f"models[{i}]")
            seen.add(name)
        state, pinned = _residency(item, i)
        models.append(Announced(model_id, names, state, pinned))
    return Heartbeat(url, tuple(models), float(ttl), leaving, zone)


def _residency(item: dict[str, Any], i: int) -> tuple[str | None, bool | None]:
    """A model's optional `state` and `pinned` in a heartbeat (budrt's model servers send them)."""
    state, pinned = item.get("state"), item.get("pinned")
    if state is not None and (not isinstance(state, str) or state not in MODEL_STATES):
        allowed = ", ".join(sorted(MODEL_STATES))
        raise invalid_request(f"'state' must be one of {allowed}.", param=f"models[{i}].state")
    if pinned is not None and not isinstance(pinned, bool):
        raise invalid_request("'pinned' must be a boolean.", param=f"models[{i}].pinned")
    return state, pinned


def normalize_url(value: Any, param: str = "url") -> str:
    """An http(s) OpenAI base URL with a host and no query, without a trailing slash."""
    if not isinstance(value, str) or not value.strip():
        raise invalid_request(
            f"'{param}' must be the replica's OpenAI base URL, e.g. http://host:port/v1.", param=param
        )
    try:
        url = URL(value.strip())
        ok = url.scheme in ("http", "https") and bool(url.host) and not url.query_string and not url.fragment
        _ = url.port  # an out-of-range port raises here
    except ValueError:
        ok = False
    if not ok or len(value) > 2048:
        raise invalid_request(
            f"'{param}' is not an http(s) base URL with a host: {value[:200]!r}.", param=param
        )
    return str(url).rstrip("/")


def _name(value: Any, param: str) -> str:
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_NAME
        or any(c.isspace() for c in value)
    ):
        raise invalid_request(
            f"'{param}' must be a model name: a non-empty string without spaces.", param=param
        )
    return value


def _conflict(message: str, param: str) -> APIError:
    return APIError(409, message, param=param, code="conflict")


@functools.cache
def allowed_networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def address_allowed(address: IPAddress, cidrs: Sequence[str]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    return any(address in net for net in allowed_networks(tuple(cidrs)))


async def pin(url: str, cidrs: Sequence[str]) -> str | None:
    """Check where `url` leads: 403 unless every address its host resolves to is in `cidrs`.
    Returns the URL to connect to instead: for http with a host name, the same URL at the
    address checked; None to use `url` itself (an address already, or https)."""
    parsed = URL(url)
    host = parsed.host or ""
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        literal = True
    except ValueError:
        addresses, literal = await _resolve(host, parsed.port), False
    for address in addresses:
        if not address_allowed(address, cidrs):
            raise APIError(
                403,
                f"'url' leads to {address}, outside the networks replicas may register from "
                "(gateway.registration_cidrs).",
                param="url",
                code="url_not_allowed",
            )
    if literal or parsed.scheme != "http":
        return None
    # One address (IPv4 first, where servers most often listen, e.g. `localhost`).
    address = next((a for a in addresses if a.version == 4), addresses[0])
    return str(parsed.with_host(str(address)))


async def _resolve(host: str, port: int | None) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
        )
        return [ipaddress.ip_address(info[4][0]) for info in infos]
    except (OSError, TimeoutError, ValueError):
        message = f"The host of 'url' ({host[:200]!r}) cannot be resolved."
        raise invalid_request(message, param="url") from None


class ReplicaTable:
    """The replicas registered by heartbeat, kept as endpoints of the `Router`'s deployments (it
    holds no state of its own). All of it synchronous, so it happens between requests."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def check(self, beat: Heartbeat) -> None:
        """409 when a name is routed elsewhere, or names a configured deployment replicas may
        not join; nothing is changed before every name passes."""
        for i, model in enumerate(beat.models):
            dep = self.router.resolve(model.id)
            if dep is not None and dep.name != model.id:
                raise _conflict(
                    f"{model.id!r} is an alias of deployment {dep.name!r}; register the model by its name.",
                    f"models[{i}].id",
                )
            if dep is not None and not dep.allow_registration:
                raise _conflict(
                    f"{model.id!r} is a configured deployment that replicas may not join "
                    "(its configuration does not set allow_registration).",
                    f"models[{i}].id",
                )
            for alias in model.aliases:
                owner = self.router.resolve(alias)
                if owner is not None and owner is not dep:
                    raise _conflict(
                        f"Alias {alias!r} is already used by deployment {owner.name!r}.",
                        f"models[{i}].aliases",
                    )
            if dep is not None and dep.dynamic and len({*dep.aliases, *model.aliases}) > MAX_ALIASES:
                # Aliases stay while the deployment lives: beats adding new ones must not pile up.
                raise _conflict(
                    f"Model {model.id!r} would have more than {MAX_ALIASES} aliases.", f"models[{i}].aliases"
                )

    def heartbeat(self, beat: Heartbeat, connect_url: str | None = None) -> tuple[list[Endpoint], bool]:
        """Register or refresh; returns the replica's endpoints and whether it is new here.
        `connect_url`: where to send its requests instead of `beat.url` (see `pin`)."""
        self.check(beat)
        now, wall = time.monotonic(), time.time()
        before = self.router.registered(beat.url)
        listed = {m.id for m in beat.models}
        for dep, ep in before:  # models the replica no longer serves
            if dep.name not in listed:
                dep.remove_endpoint(ep)
        headers = self.router.registered_headers
        if connect_url is not None:  # pinned: the name still goes in Host
            headers = {**headers, "Host": URL(beat.url).host_port_subcomponent or ""}
        out: list[Endpoint] = []
        for model in beat.models:
            dep = self.router.resolve(model.id) or self.router.add_deployment(model.id)
            if dep.dynamic:  # a configured deployment's names are its configuration's
                for alias in model.aliases:
                    self.router.add_alias(dep, alias)
            ep = dep.find(beat.url)
            if ep is None:
                ep = dep.add_endpoint(beat.url, headers=headers, connect_url=connect_url, zone=beat.zone)
                log.info("replica registered", extra={"fields": {"url": beat.url, "model": dep.name}})
            elif not ep.registered:  # a configured endpoint at this URL: it stays as configured
                continue
            elif ep.connect_url != (connect_url or ep.base_url):  # its host now resolves elsewhere
                ep.target(connect_url)
                ep.headers = headers
            ep.zone = beat.zone  # a replica moved (rescheduled elsewhere) says so in its next beat
            ep.model_state, ep.pinned = model.state, model.pinned
            ep.ttl_s = beat.ttl_s
            ep.expires = now + beat.ttl_s
            ep.heartbeat_at = wall
            ep.ready = True  # a server only heartbeats while ready; the health check may say otherwise
            out.append(ep)
        return out, not before and bool(out)

    def deregister(self, url: str) -> list[tuple[Deployment, Endpoint]]:
        gone = self.router.registered(url)
        for dep, ep in gone:
            dep.remove_endpoint(ep)
        if gone:
            log.info("replica left", extra={"fields": {"url": url, "models": [d.name for d, _ in gone]}})
        return gone

    def listing(self, configured: bool = False) -> list[dict[str, Any]]:
        """Registered replicas; with `configured`, also the deployments' configured endpoints
        (`source`: "heartbeat", "supervisor" for those `budrt serve` runs, "config" otherwise)."""
        now, wall = time.monotonic(), time.time()
        rows: dict[str, dict[str, Any]] = {}
        for dep in self.router.deployments:
            for ep in dep.endpoints:
                if not (ep.registered or configured) or ep.expires <= now:
                    continue
                source = "heartbeat" if ep.registered else "supervisor" if ep.managed else "config"
                row = rows.setdefault(
                    ep.base_url,
                    {
                        "object": "replica",
                        "url": ep.base_url,
                        "connect_url": ep.connect_url,
                        "zone": ep.zone,
                        "source": source,
                        "models": [],
                    },
                )
                row["models"].append(
                    {
                        "id": dep.name,
                        "aliases": list(dep.aliases),
                        "ready": ep.ready,
                        "ejected": ep.breaker.ejected,
                        "outstanding": ep.outstanding,
                        "state": ep.model_state,  # on the server: "resident", "loading"... (None: unknown)
                        "pinned": ep.pinned,
                    }
                )
                if ep.registered:
                    row["last_heartbeat"] = _iso(ep.heartbeat_at or wall)
                    row["expires_at"] = _iso(wall + ep.expires - now)
        return list(rows.values())


async def add_live_models(session: aiohttp.ClientSession, router: Router, rows: list[dict[str, Any]]) -> None:
    """Each budrt model server's own view of its models (`GET /v1/models`: state, memory,
    device, pinned, queue and KV-cache use) into its row as `live`, asked of all at once;
    None for a server that did not answer within LIVE_TIMEOUT_S (or is no budrt server)."""
    servers = {  # a URL configured for several models: any endpoint of budrt's own will do
        ep.base_url: ep for dep in router.deployments for ep in dep.endpoints if ep.managed or ep.registered
    }
    found = await asyncio.gather(*(_live_models(session, servers.get(row["url"])) for row in rows))
    for row, live in zip(rows, found, strict=True):
        row["live"] = live


async def _live_models(session: aiohttp.ClientSession, ep: Endpoint | None) -> list[dict[str, Any]] | None:
    if ep is None:  # an external upstream: its /v1/models says nothing of this
        return None
    timeout = aiohttp.ClientTimeout(total=LIVE_TIMEOUT_S)
    try:
        async with session.get(ep.connect_url + "/models", headers=ep.headers, timeout=timeout) as resp:
            body = await resp.json(content_type=None) if resp.status == 200 else None
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
    data = body.get("data") if isinstance(body, dict) else None
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else None


def spread(router: Router, now: float) -> list[dict[str, Any]]:
    """Per model: its available replicas by zone, and warnings where one failure would stop it
    or a zone has fewer than the deployment's `min_replicas_per_zone`."""
    zones = {e.zone for d in router.deployments for e in d.endpoints if e.zone}
    if router.zone:
        zones.add(router.zone)
    rows = []
    for dep in router.deployments:
        live = [e for e in dep.endpoints if e.available(now)]
        by_zone = dict(Counter(e.zone or "unknown" for e in live))
        rows.append(
            {
                "model": dep.name,
                "replicas": len(live),
                "zones": by_zone,
                "warnings": _fragile(dep, live, zones),
            }
        )
    return rows


def _fragile(dep: Deployment, live: list[Endpoint], zones: set[str]) -> list[str]:
    if not live:
        return ["no replica available"]
    warnings = []
    if len(live) == 1:
        warnings.append("single point of failure: one replica")
    in_zones = {e.zone for e in live if e.zone}
    if len(in_zones) == 1 and len(zones) > 1 and len(live) > 1:
        warnings.append(f"single point of failure: every replica is in zone {next(iter(in_zones))}")
    for zone in sorted(zones) if dep.min_per_zone else ():
        count = sum(e.zone == zone for e in live)
        if count < dep.min_per_zone:
            warnings.append(f"zone {zone} has {count} of the {dep.min_per_zone} replicas wanted")
    return warnings


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


class ReplicaAPI:
    """The admin routes; the router is the gateway's (`app.state.gateway`), so the admin API's
    constructor does not change."""

    def __init__(self, auth: Authenticator, identity: IdentityStore) -> None:
        self.auth = auth
        self.identity = identity

    def routes(self) -> list[Route]:
        return [
            Route("/admin/replicas/heartbeat", self.heartbeat, methods=["POST"]),
            Route("/admin/replicas", self.list_replicas, methods=["GET"]),
            Route("/admin/replicas", self.delete, methods=["DELETE"]),
        ]

    @staticmethod
    def _table(request: Request) -> ReplicaTable:
        return ReplicaTable(request.app.state.gateway.router)  # stateless: the router holds it all

    async def heartbeat(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        beat = parse_heartbeat(parse_json_body(await request.body()))
        if not p.may(REPLICAS_REGISTER):  # also a `leaving` beat for a URL nobody registered
            require(p, REPLICAS_REGISTER, "model:*")
        table = self._table(request)
        if beat.leaving:
            return await self._leave(p, table, beat.url)
        for model in beat.models:
            for name in (model.id, *model.aliases):
                require(p, REPLICAS_REGISTER, f"model:{name}")
        table.check(beat)  # a refused name costs no DNS lookup
        connect_url = await pin(beat.url, request.app.state.gateway.settings.gateway.registration_cidrs)
        endpoints, new = table.heartbeat(beat, connect_url)
        if new:
            await self._audit(p, "replicas:register", beat.url, {"models": [m.id for m in beat.models]})
        body = {
            "object": "replica",
            "url": beat.url,
            "models": [m.id for m in beat.models],
            "registered": len(endpoints),
            "ttl_s": beat.ttl_s,
            "expires_at": _iso(time.time() + beat.ttl_s),
        }
        return _json(body)

    async def delete(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        url = normalize_url(request.query_params.get("url"))
        if not p.may(REPLICAS_REGISTER):  # 403 before telling whether the URL is registered
            require(p, REPLICAS_REGISTER, "model:*")
        table = self._table(request)
        if not table.router.registered(url):
            raise APIError(404, f"No replica is registered at {url}.", param="url", code="not_found")
        return await self._leave(p, table, url)

    async def _leave(self, p: Principal, table: ReplicaTable, url: str) -> Response:
        for dep, _ in table.router.registered(url):
            require(p, REPLICAS_REGISTER, f"model:{dep.name}")
        gone = table.deregister(url)
        if gone:
            await self._audit(p, "replicas:deregister", url, {"models": [d.name for d, _ in gone]})
        return _json({"object": "replica", "url": url, "deregistered": [d.name for d, _ in gone]})

    async def list_replicas(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        require(p, REPLICAS_LIST)
        table = self._table(request)
        spread_rows = spread(table.router, time.monotonic())
        full = request.query_params.get("detail") == "full"
        rows = table.listing(configured=full)
        session = request.app.state.gateway.proxy.session
        if full and session is not None:
            await add_live_models(session, table.router, rows)
        return _json({"object": "list", "data": rows, "models": spread_rows})

    async def _audit(self, p: Principal, action: str, url: str, detail: dict[str, Any]) -> None:
        """New replicas and departures are audited; refreshing heartbeats are not (one per interval)."""
        who = f"key:{p.key_id}" if p.kind == "key" else f"jwt:{p.user}"
        try:
            await run_in_threadpool(self.identity.record, who, action, f"replica:{url}", detail)
        except Exception:  # the routing change stands; a lost audit line is logged, not fatal
            log.exception("audit write failed", extra={"fields": {"url": url}})
