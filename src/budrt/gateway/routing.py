"""Model name or alias -> deployment -> the endpoint to try next."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Iterable

from yarl import URL

from budrt.config import DeploymentConfig, GatewayConfig
from budrt.gateway.balancer import HashRing, WeightedRoundRobin, least_outstanding, p2c
from budrt.gateway.breaker import Breaker

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


class Endpoint:
    __slots__ = (
        "base_url",
        "health_url",
        "managed",
        "outstanding",
        "ready",
        "breaker",
        "index",
        "waiters",
        "_urls",
    )

    def __init__(
        self, base_url: str, managed: bool, index: int = 0, config: GatewayConfig | None = None
    ) -> None:
        config = config or GatewayConfig()
        self.base_url = base_url.rstrip("/")
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.health_url = root + "/health/ready"
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
        self._urls: dict[str, URL] = {}

    def url(self, path: str) -> URL:
        """`base_url + path`, parsed once: URL parsing is a visible cost per proxied request."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    def available(self, now: float) -> bool:
        return self.ready and self.breaker.allows(now)

    def mark_down(self) -> None:
        """Certainly unreachable (e.g. connection refused): eject now."""
        self.breaker.failure(fatal=True)

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
        "endpoints",
        "managed",
        "timeout_s",
        "upstream_headers",
        "strategy",
        "affinity_key",
        "fallbacks",
        "_wrr",
        "_ring",
    )

    def __init__(self, config: DeploymentConfig, gateway: GatewayConfig | None = None) -> None:
        self.name = config.model
        self.aliases = tuple(config.aliases)
        self.endpoints = [Endpoint(url, config.managed, i, gateway) for i, url in enumerate(config.endpoints)]
        self.managed = config.managed
        self.timeout_s = config.timeout_s
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if config.api_key is not None:
            headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self.upstream_headers = headers
        self.strategy = config.strategy
        self.affinity_key = config.affinity_key
        self.fallbacks = tuple(config.fallbacks)
        weights = list(config.weights) + [1.0] * (len(config.endpoints) - len(config.weights))
        self._wrr = WeightedRoundRobin(weights[: len(config.endpoints)])
        self._ring = HashRing([e.base_url for e in self.endpoints]) if config.strategy == "affinity" else None

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
    def __init__(self, deployments: Iterable[DeploymentConfig], gateway: GatewayConfig | None = None) -> None:
        self.deployments: list[Deployment] = []
        self._by_name: dict[str, Deployment] = {}
        for config in deployments:
            dep = Deployment(config, gateway)
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

    @staticmethod
    def pick(dep: Deployment, tried: set[Endpoint] | None = None, key: str | None = None) -> Endpoint | None:
        return dep.pick(tried, key)

    def ready(self) -> bool:
        return all(d.is_ready() for d in self.deployments)
