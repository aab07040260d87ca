"""Per-replica circuit breaker: outlier ejection after consecutive failures, half-open probe.

closed --N consecutive failures--> open (ejected for `cooldown`) --cooldown over--> half-open:
one probe request is let through; success readmits the replica (closed), failure ejects it
again for twice as long (capped). An active health check that passes also readmits it.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter

log = logging.getLogger("budrt.gateway.breaker")

EJECTIONS = Counter("budrt_gateway_replica_ejections_total", "Replicas ejected by their circuit breaker")
MAX_COOLDOWN_FACTOR = 8


class Breaker:
    __slots__ = ("name", "threshold", "base_cooldown_s", "failures", "open_until", "cooldown_s", "probing")

    def __init__(self, name: str, threshold: int, cooldown_s: float) -> None:
        self.name = name
        self.threshold = max(1, threshold)
        self.base_cooldown_s = cooldown_s
        self.failures = 0  # consecutive
        self.open_until = 0.0  # > 0: ejected (open until then, half-open after)
        self.cooldown_s = cooldown_s
        self.probing = False  # half-open: a probe request is in flight

    @property
    def ejected(self) -> bool:
        return self.open_until > 0.0

    def allows(self, now: float) -> bool:
        """May a request go to this replica now? In half-open, only one probe at a time."""
        if self.open_until == 0.0:
            return True
        return now >= self.open_until and not self.probing

    def on_attempt(self, now: float) -> None:
        if self.open_until and now >= self.open_until:
            self.probing = True

    def success(self) -> None:
        if self.open_until:
            log.info("replica readmitted", extra={"fields": {"url": self.name}})
        self.failures = 0
        self.open_until = 0.0
        self.cooldown_s = self.base_cooldown_s
        self.probing = False

    def failure(self, now: float | None = None, *, fatal: bool = False) -> None:
        """`fatal`: the replica is certainly down (connection refused): eject at once."""
        now = time.monotonic() if now is None else now
        self.failures = self.threshold if fatal else self.failures + 1
        if self.probing:  # the half-open probe failed: eject again, for longer
            self.probing = False
            self.cooldown_s = min(self.cooldown_s * 2, self.base_cooldown_s * MAX_COOLDOWN_FACTOR)
            self.open_until = now + self.cooldown_s
        elif not self.open_until and self.failures >= self.threshold:
            EJECTIONS.inc()
            log.warning("replica ejected", extra={"fields": {"url": self.name, "failures": self.failures}})
            self.open_until = now + self.cooldown_s
