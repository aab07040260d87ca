"""Model name or alias -> deployment -> the endpoint to try next."""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from yarl import URL

from budrt.config import DeploymentConfig, GatewayConfig
from budrt.gateway.balancer import HashRing, WeightedRoundRobin, least_outstanding, p2c
from budrt.gateway.breaker import Breaker
from budrt.gateway.metrics import ZONE_SPILLS

# Tasks cancelled because their endpoint stopped answering (by `Endpoint.hung`), until they see it.
_HUNG_TASKS: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()
HUNG = "budrt: endpoint stopped answering"  # the cancel message, for tracebacks


def cancelled_for_hang() -> bool:
    """In an `except CancelledError`: True if the current task was cancelled only because its
    endpoint hung; the cancel is then taken back and the task goes on (retries elsewhere, or ends
    its stream). A client disconnect or the request deadline also cancelling it wins."""
    task = asyncio.current_task()
    if task is None or task not in _HUNG_TASKS:
        return False
    _HUNG_TASKS.discard(task)
    return task.uncancel() == 0


def upstream_headers(api_key: str | None = None) -> dict[str, str]:
    """Headers sent with every request to an endpoint; `api_key` as a bearer token."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class Endpoint:
    __slots__ = (
        "base_url",
        "connect_url",
        "headers",
        "health_url",
        "managed",
        "model_state",
        "pinned",
        "outstanding",
        "ready",
        "breaker",
        "index",
        "waiters",
        "expires",
        "heartbeat_at",
        "ttl_s",
        "zone",
        "_urls",
    )

    def __init__(
        self,
        base_url: str,
        managed: bool,
        index: int = 0,
        config: GatewayConfig | None = None,
        headers: dict[str, str] | None = None,
        connect_url: str | None = None,
        zone: str | None = None,
    ) -> None:
        config = config or GatewayConfig()
        self.base_url = base_url.rstrip("/")  # what the endpoint is known by
        self.zone = zone or None  # where it runs, when known
        # Its own headers: a deployment's credentials go to its configured endpoints only.
        self.headers = headers if headers is not None else upstream_headers()
        self.target(connect_url)
        self.managed = managed
        self.index = index  # position in its deployment
        self.outstanding = 0  # requests in flight through this gateway process
        # Managed endpoints start unready until the health checker has seen them; others are
        # assumed up and only taken out by failures (their breaker).
        self.ready = not managed
        self.breaker = Breaker(self.base_url, config.breaker_failures, config.breaker_cooldown_s)
        # Tasks waiting on this endpoint (an attempt before its first byte, or a stream's relay),
        # so a hang found by the health check ends them now instead of at the read timeout.
        self.waiters: set[asyncio.Task[object]] = set()
        # Registered by heartbeat (gateway/replicas.py): routable until `expires` (monotonic);
        # configured endpoints never expire. `heartbeat_at` (wall clock) is for listing.
        self.expires = math.inf
        self.heartbeat_at: float | None = None
        self.ttl_s = 0.0  # of its last heartbeat
        # The model as its budrt model server last said (heartbeat, or an admin action's answer):
        # "resident", "loading", "available" or "failed", and whether it is pinned; None: unknown.
        self.model_state: str | None = None
        self.pinned: bool | None = None

    def target(self, connect_url: str | None) -> None:
        """Where requests and health checks go: `base_url`, or the same URL at an address pinned
        when it registered (gateway/replicas.py), so a later DNS answer cannot move it."""
        self.connect_url = (connect_url or self.base_url).rstrip("/")
        root = self.connect_url.removesuffix("/v1")
        self.health_url = root + "/health/ready"
        self._urls: dict[str, URL] = {}

    def url(self, path: str) -> URL:
        """`connect_url + path`, parsed once: URL parsing is a visible cost per proxied request."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.connect_url + path)
        return url

    @property
    def registered(self) -> bool:
        return self.heartbeat_at is not None

    def available(self, now: float) -> bool:
        # The expiry test makes a silent replica unroutable at its deadline exactly, before the
        # periodic sweep (`Router.expire`) takes it out of its deployment.
        return self.ready and self.breaker.allows(now) and now < self.expires

    def hung(self) -> int:
        """Stopped answering (health check timed out): take it out of rotation and cancel every
        request waiting on it, which retries elsewhere or ends its stream. Returns how many."""
        self.ready = False
        waiters = list(self.waiters)
        for task in waiters:
            _HUNG_TASKS.add(task)
            task.cancel(HUNG)
        return len(waiters)

    def __repr__(self) -> str:
        return f"Endpoint({self.base_url!r}, outstanding={self.outstanding}, ready={self.ready})"


class Deployment:
    __slots__ = (
        "name",
        "aliases",
        "task",
        "endpoints",
        "managed",
        "timeout_s",
        "upstream_headers",
        "strategy",
        "affinity_key",
        "fallbacks",
        "weights",
        "allow_registration",
        "dynamic",
        "drop_at",
        "zone",
        "spill_at",
        "min_per_zone",
        "_gateway",
        "_wrr",
        "_ring",
        "_spills",
    )

    def __init__(
        self,
        config: DeploymentConfig,
        gateway: GatewayConfig | None = None,
        *,
        dynamic: bool = False,
        zone: str | None = None,
    ) -> None:
        self.name = config.model
        self.aliases = tuple(config.aliases)
        self.task = config.task  # chat, embedding or image; None: not configured
        key = config.api_key.get_secret_value() if config.api_key is not None else None
        # For the configured endpoints only; replicas that register bring their own (`add_endpoint`).
        self.upstream_headers = upstream_headers(key)
        zones = list(config.zones) + [""] * (len(config.endpoints) - len(config.zones))
        self.endpoints = [
            Endpoint(url, config.managed, i, gateway, self.upstream_headers, zone=zones[i])
            for i, url in enumerate(config.endpoints)
        ]
        # The gateway's zone: its replicas there are preferred (see `pick`).
        self.zone = zone or None
        self.spill_at = (gateway or GatewayConfig()).zone_spill_at
        self.min_per_zone = config.min_replicas_per_zone
        self._spills = ZONE_SPILLS.labels(model=self.name)
        self.managed = config.managed
        self.timeout_s = config.timeout_s
        # Replicas may join by heartbeat: configured so, or created by one (`dynamic`), in which
        # case it is dropped once it has had no replica for `drop_at` (see `Router.expire`).
        self.allow_registration = config.allow_registration or dynamic
        self.dynamic = dynamic
        self.drop_at = math.inf
        self.strategy = config.strategy
        self.affinity_key = config.affinity_key
        self.fallbacks = tuple(config.fallbacks)
        weights = list(config.weights) + [1.0] * (len(config.endpoints) - len(config.weights))
        self.weights = weights[: len(config.endpoints)]
        self._gateway = gateway
        self._wrr = WeightedRoundRobin(self.weights)
        self._ring = HashRing([e.base_url for e in self.endpoints]) if config.strategy == "affinity" else None

    def find(self, base_url: str) -> Endpoint | None:
        base_url = base_url.rstrip("/")
        return next((e for e in self.endpoints if e.base_url == base_url), None)

    def add_endpoint(
        self,
        base_url: str,
        weight: float = 1.0,
        headers: dict[str, str] | None = None,
        connect_url: str | None = None,
        zone: str | None = None,
    ) -> Endpoint:
        """A replica that registered itself; routable at once (it only heartbeats when ready).
        It gets `headers`, never the deployment's (its credentials are for configured endpoints)."""
        ep = Endpoint(base_url, False, len(self.endpoints), self._gateway, headers, connect_url, zone)
        # Copy on write: a request picking from the old list meanwhile is unaffected.
        self.endpoints = [*self.endpoints, ep]
        self.weights = [*self.weights, weight]
        self.drop_at = math.inf
        self._rebalance()
        return ep

    def remove_endpoint(self, ep: Endpoint, now: float | None = None) -> bool:
        """Out of rotation; requests already sent to it finish (they hold the object). A dynamic
        deployment left without replicas is dropped after the last one's ttl (a replica that
        restarts comes back meanwhile; requests get 503 + Retry-After until then)."""
        if ep not in self.endpoints:
            return False
        i = self.endpoints.index(ep)
        self.endpoints = self.endpoints[:i] + self.endpoints[i + 1 :]
        self.weights = self.weights[:i] + self.weights[i + 1 :]
        self._rebalance()
        if self.dynamic and not self.endpoints:
            self.drop_at = (time.monotonic() if now is None else now) + ep.ttl_s
        return True

    def _rebalance(self) -> None:
        """Indexes, weights and the hash ring follow the endpoint list."""
        for i, e in enumerate(self.endpoints):
            e.index = i
        self._wrr = WeightedRoundRobin(self.weights)
        if self.strategy == "affinity":
            self._ring = HashRing([e.base_url for e in self.endpoints])

    def is_ready(self) -> bool:
        """For `/health/ready`: only endpoints budrt runs itself are expected to answer checks."""
        return not self.managed or any(e.ready for e in self.endpoints)

    def pick(self, tried: set[Endpoint] | None = None, key: str | None = None) -> Endpoint | None:
        """The next endpoint by this deployment's strategy among available ones not in `tried`."""
        now = time.monotonic()
        eps = self.endpoints
        if len(eps) == 1:  # the common case, kept cheap
            ep = eps[0]
            return ep if ep.available(now) and not (tried and ep in tried) else None
        ok = [e.available(now) and not (tried and e in tried) for e in eps]
        preferred = self._in_zone(eps, ok) if self.zone is not None else None
        if preferred is None:
            return self._choose(eps, ok, key)
        ep = self._choose(eps, preferred, key)
        if ep is not None and ep.zone != self.zone:
            self._spills.inc()
        return ep

    def _in_zone(self, eps: list[Endpoint], ok: list[bool]) -> list[bool] | None:
        """`ok` narrowed to this zone's replicas while one of them is available with fewer than
        `spill_at` requests in flight; else `ok` (the other zones take what the local ones
        cannot: a zone down or saturated costs capacity, not availability). None when no
        replica of the deployment is in this zone: there is nothing to prefer."""
        if not any(e.zone == self.zone for e in eps):
            return None
        local = [
            good and e.zone == self.zone and e.outstanding < self.spill_at
            for e, good in zip(eps, ok, strict=True)
        ]
        return local if any(local) else ok

    def _choose(self, eps: list[Endpoint], ok: list[bool], key: str | None) -> Endpoint | None:
        """By the deployment's strategy among the endpoints `ok` marks."""
        candidates = [e for e, good in zip(eps, ok, strict=True) if good]
        if not candidates:
            return None
        if self.strategy == "p2c":
            return p2c(candidates)
        if self.strategy == "weighted_rr":
            return eps[self._wrr.pick([e.index for e in candidates])]
        if self.strategy == "affinity" and key is not None and self._ring is not None:
            i = self._ring.pick(key, [e.outstanding for e in eps], ok)
            return eps[i] if i is not None else least_outstanding(candidates)
        return least_outstanding(candidates)


class Router:
    def __init__(
        self,
        deployments: Iterable[DeploymentConfig],
        gateway: GatewayConfig | None = None,
        internal_key: str | None = None,
        zone: str | None = None,
    ) -> None:
        self.gateway = gateway
        self.zone = zone  # the gateway's, given to every deployment (see `Deployment.pick`)
        # What replicas registered by heartbeat are sent: no deployment's credentials, only the
        # platform's internal key, which budrt's own model servers require (their URLs are
        # bounded by `gateway.registration_cidrs`).
        self.registered_headers = upstream_headers(internal_key)
        self.deployments: list[Deployment] = []
        self._by_name: dict[str, Deployment] = {}
        for config in deployments:
            dep = Deployment(config, gateway, zone=zone)
            for name in (dep.name, *dep.aliases):
                if name in self._by_name:
                    raise ValueError(f"model name or alias {name!r} is used by two deployments")
                self._by_name[name] = dep
            self.deployments.append(dep)
        for dep in self.deployments:
            for fb in dep.fallbacks:
                if fb not in self._by_name:
                    raise ValueError(f"deployment {dep.name!r} falls back to unknown model {fb!r}")

    def resolve(self, model: str) -> Deployment | None:
        return self._by_name.get(model)

    def chain(self, dep: Deployment) -> list[Deployment]:
        """`dep` then its fallbacks (and theirs), each once."""
        out = [dep]
        for d in out:
            for name in d.fallbacks:
                fb = self._by_name[name]
                if fb not in out:
                    out.append(fb)
        return out

    def endpoints(self) -> list[Endpoint]:
        return [e for d in self.deployments for e in d.endpoints]

    # -- replicas that register by heartbeat (gateway/replicas.py) --

    def add_deployment(self, model: str) -> Deployment:
        """A deployment for a model no configuration names, with the default strategy."""
        if model in self._by_name:
            raise ValueError(f"model name or alias {model!r} is already routed")
        dep = Deployment(DeploymentConfig(model=model), self.gateway, dynamic=True, zone=self.zone)
        self._by_name[model] = dep
        self.deployments = [*self.deployments, dep]
        return dep

    def drop_deployment(self, dep: Deployment) -> None:
        """Forget a dynamic deployment and its names (requests holding it finish)."""
        for name in (dep.name, *dep.aliases):
            if self._by_name.get(name) is dep:
                del self._by_name[name]
        self.deployments = [d for d in self.deployments if d is not dep]

    def add_alias(self, dep: Deployment, alias: str) -> None:
        owner = self._by_name.get(alias)
        if owner is dep:
            return
        if owner is not None:
            raise ValueError(f"model name or alias {alias!r} is used by deployment {owner.name!r}")
        self._by_name[alias] = dep
        dep.aliases = (*dep.aliases, alias)

    def registered(self, base_url: str) -> list[tuple[Deployment, Endpoint]]:
        """The (deployment, endpoint) pairs a replica at `base_url` registered."""
        base_url = base_url.rstrip("/")
        return [
            (d, e) for d in self.deployments for e in d.endpoints if e.registered and e.base_url == base_url
        ]

    def expire(self, now: float | None = None) -> list[tuple[Deployment, Endpoint]]:
        """Take out every registered endpoint whose heartbeats stopped (returns them), and drop
        the dynamic deployments left empty past their grace, so the table stays bounded."""
        now = time.monotonic() if now is None else now
        gone = [(d, e) for d in self.deployments for e in d.endpoints if e.expires <= now]
        for dep, ep in gone:
            dep.remove_endpoint(ep, now)
        for dep in self.deployments:
            if dep.drop_at <= now and not dep.endpoints:
                self.drop_deployment(dep)
        return gone


class ModelInFlight(Collector):
    """`budrt_gateway_model_in_flight_requests{model}`: requests sent upstream and not finished,
    per model, summed over the replicas' counters at scrape time (nothing added per request).
    An autoscaling signal next to the model servers' running and waiting counts."""

    def __init__(self) -> None:
        self.routers: weakref.WeakSet[Router] = weakref.WeakSet()  # one per gateway app

    def track(self, router: Router) -> None:
        self.routers.add(router)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "budrt_gateway_model_in_flight_requests",
            "Requests in flight upstream, per model",
            labels=["model"],
        )
        totals: dict[str, int] = {}
        for router in list(self.routers):
            for dep in router.deployments:
                totals[dep.name] = totals.get(dep.name, 0) + sum(e.outstanding for e in dep.endpoints)
        for model, count in sorted(totals.items()):
            family.add_metric([model], float(count))
        yield family


MODEL_IN_FLIGHT = ModelInFlight()
REGISTRY.register(MODEL_IN_FLIGHT)
