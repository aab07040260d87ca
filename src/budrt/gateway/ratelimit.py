"""Per-key requests-per-minute limit, in process memory (a shared store comes later)."""

from __future__ import annotations

import math
import time
from collections import deque

WINDOW_S = 60.0


class RateLimited(Exception):
    def __init__(self, limit: int, retry_after_s: float) -> None:
        super().__init__("rate limited")
        self.limit = limit
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {
            "Retry-After": str(max(1, math.ceil(self.retry_after_s))),
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{self.retry_after_s:.3f}s",
        }


class SlidingWindowLimiter:
    """Exact sliding window: the times of the last `rpm` admitted requests per key."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._hits: dict[int, deque[float]] = {}

    def check(self, key_id: int, rpm: int | None) -> dict[str, str]:
        """Admit one request or raise RateLimited; returns `x-ratelimit-*` headers to send."""
        if not rpm:
            return {}
        now = time.monotonic()
        hits = self._hits.get(key_id)
        if hits is None:
            hits = self._hits[key_id] = deque()
        cutoff = now - self.window_s
        while hits and hits[0] <= cutoff:
            hits.popleft()
        if len(hits) >= rpm:
            raise RateLimited(rpm, hits[0] + self.window_s - now)
        hits.append(now)
        reset = hits[0] + self.window_s - now
        return {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(rpm - len(hits)),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
        }
