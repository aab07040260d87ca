"""Active health checks of managed endpoints (`<root>/health/ready`)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from budrt.gateway.routing import Endpoint, Router

log = logging.getLogger("budrt.gateway.health")


class HealthChecker:
    def __init__(self, router: Router, interval_s: float, timeout_s: float = 2.0) -> None:
        self.endpoints = [e for e in router.endpoints() if e.managed]
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=min(timeout_s, max(interval_s, 0.5)))

    async def run(self, session: aiohttp.ClientSession) -> None:
        if not self.endpoints:
            return
        while True:
            await self.check_all(session)
            await asyncio.sleep(self.interval_s)

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._check(session, e) for e in self.endpoints))

    async def _check(self, session: aiohttp.ClientSession, ep: Endpoint) -> None:
        try:
            async with session.get(ep.health_url, timeout=self.timeout) as resp:
                ready = resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            ready = False
        if ready != ep.ready:
            log.info("endpoint %s", "ready" if ready else "not ready", extra={"fields": {"url": ep.base_url}})
        ep.ready = ready
        if ready and ep.breaker.ejected:  # an ejected replica that answers its check is readmitted
            ep.breaker.success()
