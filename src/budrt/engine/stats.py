"""Latency histograms the engine fills and the model server's Prometheus collector reads.

The engine cannot import prometheus_client's global registry (it is a library that may run in
any process), so it keeps plain cumulative bucket counts; `server/metrics.py` turns them into
Prometheus histograms at scrape time.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
# Compiling a grammar: about a millisecond for a small JSON schema, up to seconds for a huge one.
COMPILE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative `(le, count)` pairs including "+Inf", and the sum."""
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, running = [], 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], counts, strict=True):
            running += c
            out.append((le, running))
        return out, total


class EngineHistograms:
    """What only the engine sees (TTFT and end-to-end latency are measured by the server, at the
    HTTP edge, in `server/metrics.py`)."""

    def __init__(self) -> None:
        self.inter_token_latency = Histogram()
        self.request_queue_time = Histogram()
        self.grammar_compile_time = Histogram(COMPILE_BUCKETS)

    def items(self) -> dict[str, Histogram]:
        return {
            "inter_token_latency_seconds": self.inter_token_latency,
            "request_queue_time_seconds": self.request_queue_time,
            "grammar_compile_seconds": self.grammar_compile_time,
        }
