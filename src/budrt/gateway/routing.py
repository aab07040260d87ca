"""Model name or alias -> deployment -> the endpoint to try next."""

from __future__ import annotations

import time
from collections.abc import Iterable

from budrt.config import DeploymentConfig

# How long an endpoint that refused a connection or timed out is skipped. Short, because for
# endpoints without an active health check this is the only way back into rotation.
PASSIVE_DOWN_S = 2.0


class Endpoint:
    __slots__ = ("base_url", "health_url", "managed", "outstanding", "ready", "down_until")

    def __init__(self, base_url: str, managed: bool) -> None:
        self.base_url = base_url.rstrip("/")
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.health_url = root + "/health/ready"
        self.managed = managed
        self.outstanding = 0  # requests in flight through this gateway process
        # Managed endpoints start unready until the health checker has seen them; others are
        # assumed up and only taken out by failures.
        self.ready = not managed
        self.down_until = 0.0

    def available(self, now: float) -> bool:
        return self.ready and self.down_until <= now

    def mark_down(self, seconds: float = PASSIVE_DOWN_S) -> None:
        self.down_until = time.monotonic() + seconds

    def __repr__(self) -> str:
        return f"Endpoint({self.base_url!r}, outstanding={self.outstanding}, ready={self.ready})"


class Deployment:
    __slots__ = ("name", "aliases", "endpoints", "managed", "timeout_s", "upstream_headers")

    def __init__(self, config: DeploymentConfig) -> None:
        self.name = config.model
        self.aliases = tuple(config.aliases)
        self.endpoints = [Endpoint(url, config.managed) for url in config.endpoints]
        self.managed = config.managed
        self.timeout_s = config.timeout_s
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if config.api_key is not None:
            headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self.upstream_headers = headers

    def is_ready(self) -> bool:
        """For `/health/ready`: only endpoints budrt runs itself are expected to answer checks."""
        return not self.managed or any(e.ready for e in self.endpoints)


class Router:
    def __init__(self, deployments: Iterable[DeploymentConfig]) -> None:
        self.deployments: list[Deployment] = []
        self._by_name: dict[str, Deployment] = {}
        for config in deployments:
            dep = Deployment(config)
            for name in (dep.name, *dep.aliases):
                if name in self._by_name:
                    raise ValueError(f"model name or alias {name!r} is used by two deployments")
                self._by_name[name] = dep
            self.deployments.append(dep)

    def resolve(self, model: str) -> Deployment | None:
        return self._by_name.get(model)

    def endpoints(self) -> list[Endpoint]:
        return [e for d in self.deployments for e in d.endpoints]

    @staticmethod
    def pick(dep: Deployment, tried: set[Endpoint] | None = None) -> Endpoint | None:
        """The available endpoint with the fewest outstanding requests, skipping `tried`."""
        now = time.monotonic()
        best: Endpoint | None = None
        for ep in dep.endpoints:
            if (tried and ep in tried) or not ep.available(now):
                continue
            if best is None or ep.outstanding < best.outstanding:
                best = ep
        return best

    def ready(self) -> bool:
        return all(d.is_ready() for d in self.deployments)
