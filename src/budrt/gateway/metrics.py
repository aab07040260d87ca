"""Gateway Prometheus metrics. Labels use deployment names only, never client-supplied strings."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("budrt_gateway_requests_total", "Requests answered by the gateway", ["model", "status"])
LATENCY = Histogram(
    "budrt_gateway_request_seconds",
    "Time from request to the last byte of the response",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
IN_FLIGHT = Gauge("budrt_gateway_in_flight_requests", "Requests being proxied right now")
UPSTREAM_ERRORS = Counter(
    "budrt_gateway_upstream_errors_total", "Failed upstream attempts", ["model", "reason"]
)
TOKENS = Counter("budrt_gateway_tokens_total", "Tokens reported by upstream usage", ["model", "kind"])
ZONE_SPILLS = Counter(
    "budrt_gateway_zone_spills_total",
    "Requests sent to a replica outside the gateway's zone (local ones down, busy or tried)",
    ["model"],
)
CLIENT_DISCONNECTS = Counter(
    "budrt_gateway_client_disconnects_total", "Requests abandoned by the client", ["model"]
)

# Label children by label values. `labels()` validates and joins its arguments on every call
# (several µs, three times per request); the label values here are deployment names and
# status codes, so these maps stay small. Cleared if they ever grow past _MAX_CHILDREN
# (deployments registered and removed at run time).
_MAX_CHILDREN = 4096
_children: dict[tuple[object, ...], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, looked up in a dict after the first call."""
    key = (metric, *values)
    found = _children.get(key)
    if found is None:
        if len(_children) >= _MAX_CHILDREN:
            _children.clear()
        found = _children[key] = metric.labels(*values)
    return found


class RequestTracker:
    """Counts one request: in flight from creation until `done`, which is idempotent."""

    __slots__ = ("model", "start", "_open")

    def __init__(self, start: float) -> None:
        self.model = "unknown"  # set to the deployment name once the request is routed
        self.start = start
        self._open = True
        IN_FLIGHT.inc()

    def done(self, status: int, now: float) -> None:
        if not self._open:
            return
        self._open = False
        IN_FLIGHT.dec()
        child(REQUESTS, self.model, str(status)).inc()
        child(LATENCY, self.model).observe(now - self.start)
