"""Active health checks of managed endpoints (`<root>/health/ready`).

An endpoint that does not answer its check in time (hung: SIGSTOP, a stuck event loop) is taken
out of rotation and every request waiting on it is cancelled: those that sent nothing to their
client yet are retried on another replica (or get 503 + Retry-After), a stream already relaying
ends with an error event. Without this they would wait for the deployment's read timeout.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from budrt.gateway.routing import Endpoint, Router

log = logging.getLogger("budrt.gateway.health")
# Consecutive timed-out checks that mean "hung". Two, so that one slow answer from a busy server
# neither cancels its requests nor takes it out of rotation (a lone replica would refuse every
# request with 503 until the next check); a refused connection is not a hang (the requests fail
# by themselves) and is not ready at once.
HUNG_AFTER_TIMEOUTS = 2
NOT_READY_INTERVAL_S = 0.1  # between checks while some replica is not ready


class HealthChecker:
    def __init__(self, router: Router, interval_s: float, timeout_s: float = 2.0) -> None:
        self.router = router
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=min(timeout_s, max(interval_s, 0.5)))
        self.timeouts: dict[Endpoint, int] = {}  # consecutive timed-out checks
        self.rounds = 0  # rounds of checks done: after one, the gateway knows which replicas are up

    def targets(self) -> list[Endpoint]:
        """Endpoints to check, read each round (registered replicas come and go). A check carries
        the endpoint's own headers: a managed one its deployment's credential (the supervisor's
        internal key, which model servers require on /health/ready), a registered one the
        router's `registered_headers` (and the Host of a pinned address)."""
        return [ep for dep in self.router.deployments for ep in dep.endpoints if ep.managed or ep.registered]

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            self.sweep()
            await self.check_all(session)
            self.rounds += 1
            await asyncio.sleep(self.next_check_in())

    def next_check_in(self) -> float:
        """Seconds to the next round: `interval_s`, or less while a replica is not ready, so one
        that finishes loading (at start-up, after a restart) takes traffic within a fraction of a
        second rather than up to a whole interval later."""
        waiting = any(not ep.ready for ep in self.targets())
        return min(self.interval_s, NOT_READY_INTERVAL_S) if waiting else self.interval_s

    def sweep(self) -> None:
        for dep, ep in self.router.expire():
            log.warning(
                "registered replica expired: no heartbeat",
                extra={"fields": {"url": ep.base_url, "model": dep.name}},
            )

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        targets = self.targets()
        if len(self.timeouts) > len(targets):  # forget replicas that left
            current = set(targets)
            self.timeouts = {e: n for e, n in self.timeouts.items() if e in current}
        await asyncio.gather(*(self._check(session, e) for e in targets))

    async def _check(self, session: aiohttp.ClientSession, ep: Endpoint) -> None:
        timed_out = False
        try:
            async with session.get(ep.health_url, timeout=self.timeout, headers=ep.headers) as resp:
                # A registered external upstream may have no such route: only a hang counts then.
                ready = resp.status == 200 or (resp.status == 404 and not ep.managed)
        except TimeoutError:
            ready, timed_out = False, True
        except (aiohttp.ClientError, OSError):
            ready = False
        count = self.timeouts[ep] = self.timeouts.get(ep, 0) + 1 if timed_out else 0
        if timed_out and count < HUNG_AFTER_TIMEOUTS:
            ready = ep.ready  # one late answer from a busy server is not a verdict either way
        if count == HUNG_AFTER_TIMEOUTS or (count > HUNG_AFTER_TIMEOUTS and ep.waiters):
            cancelled = ep.hung()
            log.warning(
                "endpoint hung; requests waiting on it cancelled",
                extra={"fields": {"url": ep.base_url, "requests": cancelled}},
            )
        if ready != ep.ready:
            log.info("endpoint %s", "ready" if ready else "not ready", extra={"fields": {"url": ep.base_url}})
        ep.ready = ready
        if ready and ep.breaker.ejected:  # an ejected replica that answers its check is readmitted
            ep.breaker.success()
