"""Per-replica circuit breaker: outlier ejection after consecutive failures, half-open probe.

closed --N consecutive failures--> open (ejected for `cooldown`) --cooldown over--> half-open:
one probe request is let through; success readmits the replica (closed), failure ejects it
again for twice as long (capped). An active health check that passes also readmits it.

Requests report each attempt's outcome through `record` (what counts as a failure is decided by
the proxy: gateway/proxy.py).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from prometheus_client import Counter

log = logging.getLogger("budrt.gateway.breaker")

EJECTIONS = Counter("budrt_gateway_replica_ejections_total", "Replicas ejected by their circuit breaker")
MAX_COOLDOWN_FACTOR = 8

# What one attempt showed about its replica (plain strings: an Enum member costs more per request):
# - "ok": it served (a 2xx/3xx, or a stream's first chunk): clears its failures, readmits it;
# - "answered": it answered, with an error the request may have caused (a 4xx, a 500, a body over
#   the size cap): counts nothing, but ends a half-open probe as a success;
# - "failed": its failure (timeout, connection error, hang, 502/503/504, 401/407);
# - "down": the connection was refused, the process is gone: ejected at once;
# - "abandoned": the client left or the deadline passed first: a probe in flight is given up,
#   so the next request probes instead.
Verdict = Literal["ok", "answered", "failed", "down", "abandoned"]


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

    def record(self, verdict: Verdict) -> None:
        """The outcome of one attempt (see `Verdict`): the one place attempts reach the breaker."""
        if verdict == "ok":
            if self.failures:
                self.success()
        elif verdict == "answered":
            if self.probing:
                self.success()
        elif verdict == "abandoned":
            self.probing = False
        else:
            self.failure(fatal=verdict == "down")

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
