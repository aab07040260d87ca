"""A day of traffic through the model servers' autoscaling rules: replicas, TTFT SLO, cost (issue 19).

    .venv/bin/python bench/capacity.py              # today's (assumed) load, every rule compared
    .venv/bin/python bench/capacity.py --json       # the same, as JSON
    .venv/bin/python bench/capacity.py --load-x 10 --max-replicas 200   # ten times the load

A deterministic (seeded) simulation in 1 s steps, standard library + numpy:

- Traffic: a diurnal curve (a cosine from a night trough to a day peak) times bursts (at Poisson
  times, a few minutes each, several times the rate of that moment), Poisson arrivals, prompt and
  output lengths uniform in the ranges of the benchmark workload.
- Replicas: one text model server per pod. A pod is Pending for --pod-start-s, then loads the
  model for --load-s (reporting 0 in flight), then serves. Least-outstanding balancing is taken
  as one shared FIFO queue: a request waits only while every ready replica runs --max-num-seqs.
  A replica running n requests makes throughput(n) output tok/s (interpolated in log2 n between
  the measured points), shared evenly by its n requests. TTFT = queue wait + prompt / prefill
  tok/s + one decode step at the replica's batch (n / throughput(n)).
- Autoscaling: Prometheus scrapes each pod every --scrape-s; the HPA (autoscaling/v2, Pods
  metrics through prometheus-adapter) syncs every --sync-s and applies Kubernetes' own algorithm:
  desired = ceil(current x metric / target) outside the tolerance, pending and not yet scraped
  pods treated as Kubernetes treats them, the largest proposal among several metrics, the scale-up
  and scale-down stabilization windows, and the rate policies (default behavior: +100% or +4 pods
  per 15 s, whichever is more; -100% per 15 s). Metrics: "inflight" is budrt:num_requests_running
  + budrt:num_requests_waiting (the issue's rule, --targets), "waiting" the second alone, "tokens"
  rate(budrt:generation_tokens_total[1m]) per pod. With --min-replicas 0, KEDA scales 0 -> 1 at
  its next poll when a request waits at the gateway, and 1 -> 0 after its cooldown with nothing
  in flight.

Defaults and where they come from (docs/benchmarks.md unless named):

- throughput 95.1 / 182 / 245 output tok/s at 1 / 16 / 64 concurrent, prefill 619 tok/s, ready
  (first token after launch) 8.4 s: "Serving against llama.cpp's server (issue 16)", the budrt
  (default) row: SmolLM2-135M-Instruct Q4_1, 2 cores of an AMD EPYC (AVX2), 2026-12-04 05:06,
  commit 4149a21. The closed loops measured there include the prompts' prefill.
- prompts 64-256 tokens, outputs 32-256: that run's mixed workload (bench/serve_workload.py).
- max_num_seqs 32: ModelConfig's default (src/budrt/config.py).
- TTFT SLO 1 s (p95): issue 3's TTFT target (≤ 1 s, there a p50 at 16 concurrent).
- scrape every 30 s: the chart's serviceMonitor.interval (deploy/helm/budrt/values.yaml).
- HPA and KEDA timings: Kubernetes' and KEDA's defaults (sync 15 s, tolerance 0.1, windows 0 / 300 s;
  KEDA pollingInterval 30 s, cooldownPeriod 300 s).
- today's load (5 req/s at the day's peak, a night at 20% of it, 8 bursts a day of 3 min at 3x):
  an assumption; no production traffic has been recorded.
- pod start 0 s: the image already on a node with room (not measured: a new node takes minutes).
- the sizing table's gateway CPU, 11 ms per streamed request: the same run (the gateway's 0.7 CPU s
  for the 64 streamed requests of its c=64 phase); Redis CPU, 200 us per request with key, team
  and model limits: a probe of budrt's RedisLimiter described in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import os
import platform
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

HOUR_S = 3600
DAY_S = 24 * HOUR_S

MEASURED_TOK_S = ((1.0, 95.1), (16.0, 182.0), (64.0, 245.0))
PREFILL_TOK_S = 619.0
LOAD_S = 8.4
PROMPT_TOKENS = (64, 256)
OUTPUT_TOKENS = (32, 256)
MAX_NUM_SEQS = 32
TTFT_SLO_S = 1.0

SOURCES = {
    "throughput": "docs/benchmarks.md, 'Serving against llama.cpp's server (issue 16)', budrt (default): "
    "95.1 / 182 / 245 output tok/s at concurrency 1 / 16 / 64 · 2026-12-04 05:06 · AMD EPYC (AVX2), 2 cores",
    "prefill_tok_s": "same row: prefill 619 tok/s (1,000-token prompt)",
    "load_s": "same row: ready 8.4 s from launch to the first token",
    "request_sizes": "same run's mixed workload: prompts 64-256, outputs 32-256 tokens (uniform)",
    "max_num_seqs": "src/budrt/config.py ModelConfig.max_num_seqs default (32)",
    "ttft_slo_s": "issue 3's TTFT target, 1 s (docs/benchmarks.md, 'TTFT p50 @ c=16')",
    "scrape_s": "deploy/helm/budrt/values.yaml serviceMonitor.interval (30s)",
    "hpa": "Kubernetes defaults: sync 15 s, tolerance 0.1, stabilization 0 s up / 300 s down, "
    "scale-up max(+100%, +4 pods) per 15 s, scale-down 100% per 15 s",
    "keda": "KEDA defaults: pollingInterval 30 s, cooldownPeriod 300 s",
    "traffic": "assumed (no production traffic recorded): peak 5 req/s, night 20% of peak, "
    "8 bursts/day of 3 min at 3x",
    "pod_start_s": "assumed 0 s (image on a node with room; not measured)",
    "gateway_cpu": "docs/benchmarks.md, issue-16 run: the gateway took 0.7 CPU s for 64 streamed requests "
    "(~11 ms each) · EPYC (AVX2); 750 µs per short non-streamed request ('Gateway', over HTTP, 2026-12-04)",
    "redis_cpu": "docs/scaling.md: budrt's RedisLimiter, acquire + release, redis-server 6.2 · 2026-12-04 · "
    "AMD EPYC, 2 cores: ~80 µs per request with a key limit, ~200 µs with key + team + model limits",
}


# ---------------------------------------------------------------- assumptions


@dataclass(frozen=True)
class Traffic:
    peak_rps: float = 5.0  # requests/s at the day's peak, before bursts
    trough: float = 0.2  # the night's rate as a fraction of the peak
    peak_hour: float = 14.0
    bursts_per_day: float = 8.0
    burst_s: float = 180.0
    burst_x: float = 3.0  # a burst multiplies the rate of its moment
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS
    output_tokens: tuple[int, int] = OUTPUT_TOKENS
    hours: float = 24.0


@dataclass(frozen=True)
class Replica:
    tok_s: tuple[tuple[float, float], ...] = MEASURED_TOK_S  # (concurrency, output tok/s) measured
    prefill_tok_s: float = PREFILL_TOK_S
    max_num_seqs: int = MAX_NUM_SEQS
    load_s: float = LOAD_S  # process start + model load, to the first token
    pod_start_s: float = 0.0  # scheduling, image pull, container start (Pending)

    def throughput(self, n: float) -> float:
        """Output tok/s of one replica running n requests: linear in log2(n) between the measured
        points (batching gains shrink as the batch grows), flat beyond the last one."""
        x = math.log2(max(n, 1.0))
        xs, ys = self._curve
        if x <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, x)
        if i == len(xs):
            return ys[-1]
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])

    @cached_property
    def _curve(self) -> tuple[list[float], list[float]]:
        return [math.log2(c) for c, _ in self.tok_s], [r for _, r in self.tok_s]

    def capacity_rps(self, n: float, mean_output: float) -> float:
        """Requests/s one replica finishes while holding n in flight (Little's law: each request
        takes mean_output / (throughput(n) / n) seconds, n of them at once)."""
        return self.throughput(n) / mean_output


@dataclass(frozen=True)
class Policy:
    kind: str  # "Pods" or "Percent", as in HPAScalingPolicy
    value: int
    period_s: float


@dataclass(frozen=True)
class Metric:
    """One Pods metric of the HPA, with its averageValue target per pod."""

    name: str  # "inflight" (running + waiting), "waiting", or "tokens" (output tok/s, a rate)
    target: float


@dataclass(frozen=True)
class Rules:
    # Several metrics: Kubernetes takes the largest proposal among them.
    metrics: tuple[Metric, ...] = (Metric("inflight", 8.0),)
    tolerance: float = 0.1
    min_replicas: int = 1  # 0: KEDA scales to and from zero, the HPA below it keeps 1
    max_replicas: int = 20
    sync_s: int = 15
    scrape_s: int = 30
    up_window_s: float = 0.0
    down_window_s: float = 300.0
    up_policies: tuple[Policy, ...] = (Policy("Percent", 100, 15), Policy("Pods", 4, 15))
    down_policies: tuple[Policy, ...] = (Policy("Percent", 100, 15),)
    keda_poll_s: int = 30
    keda_cooldown_s: float = 300.0
    rate_window_s: float = 60.0  # rate(budrt:generation_tokens_total[1m]) for the tokens metric
    fixed: int | None = None  # a fixed deployment of this many pods: no autoscaler
    initial: int | None = None  # pods at t = 0; None: the steady count at the first minute's rate


# ---------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Workload:
    arrival: np.ndarray  # seconds from the start, sorted
    prompt: np.ndarray  # tokens
    output: np.ndarray  # tokens
    duration_s: int
    bursts: tuple[tuple[float, float], ...] = ()  # (start s, length s)

    @property
    def mean_output(self) -> float:
        return float(self.output.mean()) if len(self.output) else 0.0


def diurnal_rate(traffic: Traffic, t: np.ndarray) -> np.ndarray:
    """Requests/s at second t: a cosine with its top at peak_hour and its bottom 12 h later."""
    phase = 2 * math.pi * (t / HOUR_S - traffic.peak_hour) / 24
    return traffic.peak_rps * (traffic.trough + (1 - traffic.trough) * (1 + np.cos(phase)) / 2)


def make_workload(traffic: Traffic, seed: int) -> Workload:
    """The day's requests; the same seed gives the same requests, whatever the scaling rules."""
    rng = np.random.default_rng(seed)
    duration = int(traffic.hours * HOUR_S)
    t = np.arange(duration, dtype=float)
    rate = diurnal_rate(traffic, t)
    # The day's share of bursts at Poisson times (given their count, uniform): a fixed count keeps
    # seeds comparable, so that no seed's day happens to be quiet.
    count = round(traffic.bursts_per_day * duration / DAY_S)
    starts = np.sort(rng.uniform(0, duration, count))
    for start in starts:  # overlapping bursts do not compound: each multiplies the base curve
        inside = (t >= start) & (t < start + traffic.burst_s)
        rate[inside] = diurnal_rate(traffic, t[inside]) * traffic.burst_x
    per_second = rng.poisson(rate)
    arrival = np.repeat(t, per_second) + rng.uniform(0, 1, per_second.sum())
    arrival.sort()  # offsets within a second are independent of the second's other requests
    n = len(arrival)
    prompt = rng.integers(traffic.prompt_tokens[0], traffic.prompt_tokens[1] + 1, n)
    output = rng.integers(traffic.output_tokens[0], traffic.output_tokens[1] + 1, n)
    bursts = tuple((float(s), traffic.burst_s) for s in starts)
    return Workload(arrival, prompt, output, duration, bursts)


# ---------------------------------------------------------------- the HPA


def metric_replicas(
    samples: Sequence[float | None], pending: int, current: int, target: float, tolerance: float
) -> int | None:
    """Kubernetes' replica count for a Pods metric (replica_calculator.go, calcPlainMetricReplicas).

    `samples` has one entry per pod that is not Pending: its metric, or None when the pod has not
    been scraped yet (missing). `pending` counts Pending pods. None: no metric at all, so the HPA
    does not scale. For a custom metric Kubernetes ignores readiness: a loading pod reports 0."""
    reported = [v for v in samples if v is not None]
    if not reported:
        return None
    missing = len(samples) - len(reported)
    ratio = sum(reported) / len(reported) / target
    up_with_pending = pending > 0 and ratio > 1.0
    if not up_with_pending and missing == 0:
        if abs(1.0 - ratio) <= tolerance:
            return current
        return math.ceil(ratio * len(reported))
    # Missing pods count at the target on a scale-down and at 0 on a scale-up; Pending pods at 0
    # on a scale-up: both damp the change, never reverse it.
    filled = reported + [target if ratio < 1.0 else 0.0] * missing
    if up_with_pending:
        filled += [0.0] * pending
    new_ratio = sum(filled) / len(filled) / target
    if abs(1.0 - new_ratio) <= tolerance or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
        return current
    proposal = math.ceil(new_ratio * len(filled))
    if (new_ratio < 1.0 and proposal > current) or (new_ratio > 1.0 and proposal < current):
        return current
    return proposal


class Hpa:
    """One HorizontalPodAutoscaler with `behavior` (horizontal.go): stabilization, then rate limits.
    Only selectPolicy Max (the default) is modelled."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.recommendations: list[tuple[float, int]] = []  # (time, unstabilized proposal)
        self.ups: list[tuple[float, int]] = []  # (time, pods added)
        self.downs: list[tuple[float, int]] = []  # (time, pods removed)

    def reconcile(
        self, now: float, current: int, samples: dict[str, list[float | None]], pending: int
    ) -> int:
        """The replica count after one sync, from each metric's per-pod samples; records the scale
        event it makes."""
        r = self.rules
        low = max(r.min_replicas, 1)  # with KEDA (min 0) the HPA's own minReplicas is 1
        if current == 0:
            return 0  # Kubernetes: autoscaling is disabled while the target has 0 replicas
        if current > r.max_replicas:
            desired = r.max_replicas
        elif current < low:
            desired = low
        else:
            proposal = self._proposal(current, samples, pending)
            if proposal is None:
                return current
            desired = self._rate_limit(now, current, self._stabilize(now, current, proposal), low)
        if desired > current:
            self.ups.append((now, desired - current))
        elif desired < current:
            self.downs.append((now, current - desired))
        return desired

    def _proposal(self, current: int, samples: dict[str, list[float | None]], pending: int) -> int | None:
        """The largest proposal among the metrics (computeReplicasForMetrics). Without any metric,
        or with one missing when the rest would scale down, the HPA keeps the current count."""
        proposals = [
            metric_replicas(samples[m.name], pending, current, m.target, self.rules.tolerance)
            for m in self.rules.metrics
        ]
        valid = [p for p in proposals if p is not None]
        if not valid or (len(valid) < len(proposals) and max(valid) < current):
            return None
        return max(valid)

    def _stabilize(self, now: float, current: int, proposal: int) -> int:
        """Scale up no further than the lowest proposal within the up window, and down no further
        than the highest within the down window (stabilizeRecommendationWithBehaviors)."""
        up_cut, down_cut = now - self.rules.up_window_s, now - self.rules.down_window_s
        up = min([p for t, p in self.recommendations if t > up_cut] + [proposal])
        down = max([p for t, p in self.recommendations if t > down_cut] + [proposal])
        self.recommendations = [(t, p) for t, p in self.recommendations if t > min(up_cut, down_cut)]
        self.recommendations.append((now, proposal))
        return min(max(current, up), down)

    def _start(self, now: float, current: int, period_s: float) -> int:
        """Replicas at the start of the policy's period: current less what it added, plus what it
        removed, within the period (getReplicasChangePerPeriod)."""
        added = sum(n for t, n in self.ups if t > now - period_s)
        removed = sum(n for t, n in self.downs if t > now - period_s)
        return current - added + removed

    def _rate_limit(self, now: float, current: int, desired: int, low: int) -> int:
        """convertDesiredReplicasWithBehaviorRate with selectPolicy Max: the most permissive policy."""
        r = self.rules
        longest = max(p.period_s for p in r.up_policies + r.down_policies)
        self.ups = [(t, n) for t, n in self.ups if t > now - longest]
        self.downs = [(t, n) for t, n in self.downs if t > now - longest]
        if desired > current:
            limits = []
            for p in r.up_policies:
                start = self._start(now, current, p.period_s)
                limits.append(start + p.value if p.kind == "Pods" else math.ceil(start * (1 + p.value / 100)))
            return min(desired, r.max_replicas, max(max(limits), current))
        if desired < current:
            limits = []
            for p in r.down_policies:
                start = self._start(now, current, p.period_s)
                limits.append(start - p.value if p.kind == "Pods" else int(start * (1 - p.value / 100)))
            return max(desired, low, min(min(limits), current))
        return desired


# ---------------------------------------------------------------- pods


@dataclass
class Pod:
    id: int
    start: float


class Pods:
    """The deployment's pods, oldest first: Pending for pod_start_s, loading for load_s, then ready.
    A scale-down removes the newest first (ReplicaSet prefers not-ready, then recently ready pods)."""

    def __init__(self, replica: Replica, count: int, start: float) -> None:
        self.replica = replica
        self.pods: list[Pod] = []
        self.ready_at: list[float] = []  # sorted, since pods are kept in start order
        self.next_id = 0
        self.resize(count, start)

    def __len__(self) -> int:
        return len(self.pods)

    def ready(self, now: float) -> int:
        return bisect.bisect_right(self.ready_at, now)

    def pending(self, pod: Pod, now: float) -> bool:
        return now < pod.start + self.replica.pod_start_s

    def resize(self, count: int, now: float) -> None:
        # A removed pod's running requests finish on the others (the pooled queue); its draining
        # time is not billed, a small undercount after each scale-down.
        while len(self.pods) > count:
            self.pods.pop()
            self.ready_at.pop()
        while len(self.pods) < count:
            self.pods.append(Pod(self.next_id, now))
            self.ready_at.append(now + self.replica.pod_start_s + self.replica.load_s)
            self.next_id += 1


# ---------------------------------------------------------------- the simulation


@dataclass
class RunResult:
    """One configuration's day: per request its TTFT, per second the pods, ready pods, queue and
    requests finished."""

    label: str
    ttft: np.ndarray  # seconds per request, inf when not started before the end
    arrival: np.ndarray
    pods: np.ndarray  # per second
    ready: np.ndarray
    queue: np.ndarray
    served: np.ndarray
    scale_events: int

    @property
    def replica_hours(self) -> float:
        return float(self.pods.sum()) / HOUR_S  # a loading pod costs as much as a serving one

    def summary(self, slo_s: float) -> dict[str, Any]:
        return {
            "config": self.label,
            "replica_hours": round(self.replica_hours, 1),
            "replicas_mean": round(float(self.pods.mean()), 2) if len(self.pods) else 0.0,
            "replicas_max": int(self.pods.max()) if len(self.pods) else 0,
            "requests": len(self.ttft),
            "unserved": int(np.isinf(self.ttft).sum()),
            "ttft_p50_s": percentile(self.ttft, 50),
            "ttft_p95_s": percentile(self.ttft, 95),
            "ttft_p99_s": percentile(self.ttft, 99),
            "slo_attainment": attainment(self.ttft, slo_s),
            "slo_met": percentile(self.ttft, 95) <= slo_s,
            "scale_events": self.scale_events,
        }

    def hourly_rows(self, slo_s: float) -> list[dict[str, Any]]:
        hour_of = (self.arrival // HOUR_S).astype(int)
        rows = []
        for i in range(math.ceil(len(self.pods) / HOUR_S)):
            span = slice(i * HOUR_S, (i + 1) * HOUR_S)
            seconds = len(self.pods[span])
            ttft = self.ttft[hour_of == i]
            rows.append(
                {
                    "hour": i,
                    "offered_rps": round(len(ttft) / seconds, 2),
                    "served_rps": round(float(self.served[span].sum()) / seconds, 2),
                    "replicas_mean": round(float(self.pods[span].mean()), 2),
                    "replicas_max": int(self.pods[span].max()),
                    "ready_mean": round(float(self.ready[span].mean()), 2),
                    "queue_mean": round(float(self.queue[span].mean()), 2),
                    "queue_max": int(self.queue[span].max()),
                    "ttft_p95_s": percentile(ttft, 95),
                    "slo_attainment": attainment(ttft, slo_s),
                }
            )
        return rows


def attainment(ttft: np.ndarray, slo_s: float) -> float:
    """The fraction of requests whose first token came within the SLO."""
    return round(float((ttft <= slo_s).mean()), 4) if len(ttft) else 1.0


def percentile(values: np.ndarray, q: float) -> float:
    """The q-th percentile as an observed value (method "higher": unserved requests stay inf)."""
    if len(values) == 0:
        return 0.0
    return round(float(np.percentile(values, q, method="higher")), 3)


def steady_replicas(replica: Replica, rate: float, mean_output: float, target: float) -> int:
    """Pods an HPA settles at for a steady rate: each holds `target` in flight, so each finishes
    capacity_rps(target) requests/s."""
    if rate <= 0:
        return 0
    return math.ceil(rate / replica.capacity_rps(target, mean_output))


def steady_pods(replica: Replica, metric: Metric, rate: float, mean_output: float) -> int:
    """The same for any metric: a tokens target is met when the pods share rate x mean_output
    tok/s; a queue (waiting) target asks for nothing while there is no queue."""
    if metric.name == "tokens":
        return math.ceil(rate * mean_output / metric.target)
    if metric.name == "inflight":
        return steady_replicas(replica, rate, mean_output, metric.target)
    return 0


class Simulation:
    """One configuration through one workload, second by second."""

    def __init__(self, workload: Workload, replica: Replica, rules: Rules, label: str) -> None:
        self.w, self.replica, self.rules, self.label = workload, replica, rules, label
        self.hpa = Hpa(rules)
        self.pods = Pods(replica, self._initial_pods(), start=-1e9)  # ready from the start
        # Plain lists: the loop reads one element at a time, where numpy scalars are slow.
        self.arrival: list[float] = workload.arrival.tolist()
        self.prompt: list[int] = workload.prompt.tolist()
        self.output: list[int] = workload.output.tolist()
        seconds = np.arange(1, workload.duration_s + 1)
        self.arrived_by: list[int] = np.searchsorted(workload.arrival, seconds).tolist()  # index ends
        self.ttft = [math.inf] * len(self.arrival)
        self.queue: deque[int] = deque()  # request indices waiting for a slot, FIFO
        self.finish: list[float] = []  # heap: decode-clock value at which each running request ends
        self.clock = 0.0  # output tokens each running request has received since t = 0
        self.next_arrival = 0
        self.scraped: dict[int, dict[str, float]] = {}  # pod id -> metric -> value, at the last scrape
        self.generated = [0.0]  # output tokens generated before each second (a counter's history)
        self.last_busy = 0.0
        self.events = 0  # scale events (HPA and KEDA)
        self.series: dict[str, list[int]] = {"pods": [], "ready": [], "queue": [], "served": []}

    def _initial_pods(self) -> int:
        """What the autoscaler would hold at the first minute's rate (a day starts mid-stream)."""
        r = self.rules
        if r.fixed is not None or r.initial is not None:
            return r.fixed if r.fixed is not None else r.initial
        rate = float((self.w.arrival < 60).sum()) / 60
        n = max(steady_pods(self.replica, m, rate, self.w.mean_output or 1.0) for m in r.metrics)
        return min(max(n, r.min_replicas), r.max_replicas)

    def run(self) -> RunResult:
        series = self.series
        for t in range(self.w.duration_s):
            self.queue.extend(range(self.next_arrival, self.arrived_by[t]))
            self.next_arrival = self.arrived_by[t]
            ready = self.pods.ready(t)
            self._admit(t, ready)
            series["served"].append(self._decode(ready))
            if t % self.rules.scrape_s == 0:
                self._scrape(t, ready)
            if self.rules.fixed is None:
                self._autoscale(t)
            series["pods"].append(len(self.pods))
            series["ready"].append(ready)
            series["queue"].append(len(self.queue))
        arrays = {k: np.array(v, dtype=np.int64) for k, v in series.items()}
        return RunResult(self.label, np.array(self.ttft), self.w.arrival, **arrays, scale_events=self.events)

    def _admit(self, t: int, ready: int) -> None:
        """Start waiting requests in free slots; a request's TTFT is fixed when it starts."""
        free = ready * self.replica.max_num_seqs - len(self.finish)
        started = []
        while free > 0 and self.queue:
            started.append(self.queue.popleft())
            free -= 1
        if not started:
            return
        n = (len(self.finish) + len(started)) / ready  # running per replica once they join
        step_s = max(n, 1.0) / self.replica.throughput(n)  # the decode step each one joins
        prefill = self.replica.prefill_tok_s
        for i in started:
            wait = max(t - self.arrival[i], 0.0)  # one that arrived during this second starts at once
            self.ttft[i] = wait + self.prompt[i] / prefill + step_s
            heapq.heappush(self.finish, self.clock + self.output[i])

    def _decode(self, ready: int) -> int:
        """One second of decoding: every running request gets throughput(n) / n tokens. Returns
        how many requests finished."""
        running = len(self.finish)
        if running == 0 or ready == 0:
            self.generated.append(self.generated[-1])
            return 0
        n = max(running / ready, 1.0)  # fewer requests than replicas: each has a replica to itself
        per_request = self.replica.throughput(n) / n
        self.clock += per_request
        self.generated.append(self.generated[-1] + per_request * running)
        done = 0
        while self.finish and self.finish[0] <= self.clock:
            heapq.heappop(self.finish)
            done += 1
        return done

    def _scrape(self, t: int, ready: int) -> None:
        """Each pod's metrics as the HPA reads them through Prometheus. Waiting requests sit in the
        ready replicas' queues; with none ready they wait at the gateway, where no pod metric sees
        them. Tokens are a rate over the window, shared by the pods ready now."""
        waiting = len(self.queue) if ready else 0
        window = min(self.rules.rate_window_s, t + 1)
        tokens = (self.generated[-1] - self.generated[-1 - int(window)]) / window
        per_ready = {"inflight": len(self.finish) + waiting, "waiting": waiting, "tokens": tokens}
        idle = dict.fromkeys(per_ready, 0.0)  # a loading pod: its server answers with nothing running
        self.scraped = {}
        for k, pod in enumerate(self.pods.pods):
            if self.pods.pending(pod, t):
                continue  # no container yet, nothing to scrape
            self.scraped[pod.id] = {m: v / ready for m, v in per_ready.items()} if k < ready else idle

    def _autoscale(self, t: int) -> None:
        r = self.rules
        if len(self.finish) or self.queue:
            self.last_busy = t
        if r.min_replicas == 0 and t % r.keda_poll_s == 0 and self._keda(t):
            return
        if t % r.sync_s or len(self.pods) == 0:
            return
        scraped = [self.scraped.get(p.id) for p in self.pods.pods if not self.pods.pending(p, t)]
        samples = {m.name: [v[m.name] if v else None for v in scraped] for m in r.metrics}
        pending = sum(self.pods.pending(p, t) for p in self.pods.pods)
        current = len(self.pods)
        desired = self.hpa.reconcile(t, current, samples, pending)
        if desired != current:
            self.events += 1
            self.pods.resize(desired, t)

    def _keda(self, t: int) -> bool:
        """KEDA's activation: 0 -> 1 when the gateway holds a request for the model, back to 0 after
        the cooldown with nothing in flight. True when it changed the replica count."""
        current = len(self.pods)
        if current == 0 and self.queue:
            self.pods.resize(1, t)
        elif (
            current > 0
            and not self.finish
            and not self.queue
            and t - self.last_busy >= self.rules.keda_cooldown_s
        ):
            self.pods.resize(0, t)
        else:
            return False
        self.events += 1
        return True


# ---------------------------------------------------------------- sizing beyond the simulation

# docs/benchmarks.md, "Serving against llama.cpp's server (issue 16)": through `budrt serve` the
# gateway took 0.7 CPU s for the 64 streamed requests of the c=64 phase (mean ~144 output tokens)
# on the EPYC. Per request that is ~11 ms: relaying SSE chunks, not the request path, dominates.
GATEWAY_CPU_S_PER_STREAM = 0.7 / 64
# docs/scaling.md ("Redis"): Redis's own CPU for one request's acquire + release scripts with
# key, team and model limits (rpm + tpm each, a day budget on the team), budrt's RedisLimiter.
REDIS_CPU_S_PER_REQUEST = 200e-6
REPLICA_CORES = 2  # the serving figures ran on 2 cores


def sizing(
    replica: Replica, traffic: Traffic, mean_output: float, target: float, multipliers: Sequence[float]
) -> list[dict[str, Any]]:
    """Steady-state counts per tier at the day's peak and at a burst on top of it, for each load
    multiple: model-server pods (CPU replicas as measured), gateway cores, and the shared stores'
    operation rates each request causes (2 Redis scripts when limits are set; 1 usage row). Redis
    runs scripts on one thread: more than 1 Redis core means one Redis cannot keep up."""
    rows = []
    for x in multipliers:
        peak = traffic.peak_rps * x
        burst = peak * max(traffic.burst_x, 1.0)
        rows.append(
            {
                "load_x": x,
                "peak_rps": round(peak, 1),
                "burst_rps": round(burst, 1),
                "model_pods_peak": steady_replicas(replica, peak, mean_output, target),
                "model_pods_burst": steady_replicas(replica, burst, mean_output, target),
                "model_cores_burst": steady_replicas(replica, burst, mean_output, target) * REPLICA_CORES,
                "gateway_cores_peak": round(peak * GATEWAY_CPU_S_PER_STREAM, 2),
                "gateway_cores_burst": round(burst * GATEWAY_CPU_S_PER_STREAM, 2),
                "redis_scripts_per_s_burst": round(2 * burst),
                "redis_cores_burst": round(burst * REDIS_CPU_S_PER_REQUEST, 2),
                "usage_rows_per_s_burst": round(burst),
                "usage_rows_per_day": round(traffic_per_day(traffic) * x),
            }
        )
    return rows


def traffic_per_day(traffic: Traffic) -> float:
    """Requests a day on the diurnal curve alone (bursts add a few percent)."""
    return traffic.peak_rps * (traffic.trough + (1 - traffic.trough) / 2) * DAY_S


# ---------------------------------------------------------------- the command


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def parse_tok_s(text: str) -> tuple[tuple[float, float], ...]:
    """ "1:95.1,16:182,64:245" -> ((1, 95.1), (16, 182), (64, 245)), sorted by concurrency."""
    points = []
    for part in text.split(","):
        c, _, r = part.partition(":")
        points.append((float(c), float(r)))
    return tuple(sorted(points))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--ttft-slo-s", type=float, default=TTFT_SLO_S, help="p95 TTFT target")
    p.add_argument(
        "--hourly",
        type=int,
        default=-2,
        help="which configuration's hours to print (index; -2: the last HPA)",
    )
    _traffic_args(p.add_argument_group("traffic"))
    _replica_args(p.add_argument_group("replica"))
    _autoscaling_args(p.add_argument_group("autoscaling"))
    return p.parse_args(argv)


def _traffic_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--hours", type=float, default=24.0)
    g.add_argument("--peak-rps", type=float, default=5.0, help="requests/s at the day's peak, before bursts")
    g.add_argument("--load-x", type=float, default=1.0, help="multiplies --peak-rps (10: ten times today's)")
    g.add_argument("--trough", type=float, default=0.2, help="night rate as a fraction of the peak")
    g.add_argument("--peak-hour", type=float, default=14.0)
    g.add_argument("--bursts-per-day", type=float, default=8.0)
    g.add_argument("--burst-minutes", type=float, default=3.0)
    g.add_argument("--burst-x", type=float, default=3.0, help="a burst multiplies the rate of its moment")
    g.add_argument("--prompt-tokens", type=int, nargs=2, default=list(PROMPT_TOKENS), metavar=("LO", "HI"))
    g.add_argument("--output-tokens", type=int, nargs=2, default=list(OUTPUT_TOKENS), metavar=("LO", "HI"))


def _replica_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--tok-s", default="1:95.1,16:182,64:245", help="measured concurrency:output tok/s points")
    g.add_argument("--prefill-tok-s", type=float, default=PREFILL_TOK_S)
    g.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    g.add_argument("--load-s", type=float, default=LOAD_S, help="launch to first token")
    g.add_argument("--pod-start-s", type=float, default=0.0, help="Pending: scheduling, image pull, node")


def _autoscaling_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--targets", type=float, nargs="+", default=[4.0, 8.0, 16.0], help="running+waiting per pod"
    )
    g.add_argument(
        "--tokens-target",
        type=float,
        default=-1,
        help="output tok/s per pod; -1: the middle target's; 0: none",
    )
    g.add_argument("--waiting-target", type=float, default=2.0, help="waiting per pod beside tok/s; 0: none")
    g.add_argument("--rate-window-s", type=float, default=60.0)
    g.add_argument("--tolerance", type=float, default=0.1)
    g.add_argument("--min-replicas", type=int, default=1, help="0: KEDA scales to zero")
    g.add_argument("--max-replicas", type=int, default=20)
    g.add_argument("--sync-s", type=int, default=15)
    g.add_argument("--scrape-s", type=int, default=30)
    g.add_argument("--up-window-s", type=float, default=0.0)
    g.add_argument("--down-window-s", type=float, default=300.0)
    g.add_argument("--up-percent", type=int, default=100)
    g.add_argument("--up-pods", type=int, default=4)
    g.add_argument("--up-period-s", type=float, default=15.0)
    g.add_argument("--down-percent", type=int, default=100)
    g.add_argument("--down-period-s", type=float, default=15.0)
    g.add_argument("--keda-poll-s", type=int, default=30)
    g.add_argument("--keda-cooldown-s", type=float, default=300.0)
    g.add_argument(
        "--fixed-replicas",
        type=int,
        default=-1,
        help="-1: sized for the busiest minute at the middle target; 0: none",
    )


def build(args: argparse.Namespace) -> tuple[Traffic, Replica, Rules]:
    traffic = Traffic(
        peak_rps=args.peak_rps * args.load_x,
        trough=args.trough,
        peak_hour=args.peak_hour,
        bursts_per_day=args.bursts_per_day,
        burst_s=args.burst_minutes * 60,
        burst_x=args.burst_x,
        prompt_tokens=tuple(args.prompt_tokens),
        output_tokens=tuple(args.output_tokens),
        hours=args.hours,
    )
    replica = Replica(
        parse_tok_s(args.tok_s), args.prefill_tok_s, args.max_num_seqs, args.load_s, args.pod_start_s
    )
    rules = Rules(
        tolerance=args.tolerance,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        sync_s=args.sync_s,
        scrape_s=args.scrape_s,
        up_window_s=args.up_window_s,
        down_window_s=args.down_window_s,
        up_policies=(
            Policy("Percent", args.up_percent, args.up_period_s),
            Policy("Pods", args.up_pods, args.up_period_s),
        ),
        down_policies=(Policy("Percent", args.down_percent, args.down_period_s),),
        keda_poll_s=args.keda_poll_s,
        keda_cooldown_s=args.keda_cooldown_s,
        rate_window_s=args.rate_window_s,
    )
    return traffic, replica, rules


def configurations(args: argparse.Namespace, replica: Replica) -> list[tuple[str, tuple[Metric, ...]]]:
    """The HPA rules compared: the in-flight metric at each target, then at the middle target's
    operating point the tokens/s metric alone and with a queue (waiting) metric beside it."""
    configs = [(f"HPA in flight {t:g}", (Metric("inflight", t),)) for t in args.targets]
    middle = sorted(args.targets)[len(args.targets) // 2]
    tokens = args.tokens_target if args.tokens_target >= 0 else round(replica.throughput(middle))
    if tokens > 0:
        configs.append((f"HPA tok/s {tokens:g}", (Metric("tokens", tokens),)))
        if args.waiting_target > 0:
            both = (Metric("tokens", tokens), Metric("waiting", args.waiting_target))
            configs.append((f"HPA tok/s {tokens:g} + waiting {args.waiting_target:g}", both))
    return configs


def compare(
    workload: Workload,
    replica: Replica,
    rules: Rules,
    configs: Sequence[tuple[str, tuple[Metric, ...]]],
    fixed: int,
    fixed_target: float = 8.0,
) -> list[RunResult]:
    """One run per configuration on the same requests, then a fixed deployment (fixed < 0: sized
    for the day's busiest minute at fixed_target in flight per pod, what a deployment without
    autoscaling must hold)."""
    runs = []
    suffix = " (KEDA, min 0)" if rules.min_replicas == 0 else ""
    for label, metrics in configs:
        runs.append(Simulation(workload, replica, replace(rules, metrics=metrics), label + suffix).run())
    if fixed < 0:
        fixed = steady_replicas(
            replica, busiest_minute_rps(workload), workload.mean_output or 1.0, fixed_target
        )
    if fixed > 0:
        runs.append(Simulation(workload, replica, replace(rules, fixed=fixed), f"fixed {fixed} pods").run())
    return runs


def busiest_minute_rps(workload: Workload) -> float:
    """Requests/s in the minute with the most arrivals."""
    if not len(workload.arrival):
        return 0.0
    per_minute = np.bincount((workload.arrival // 60).astype(int))
    return float(per_minute.max()) / 60


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of the given (key, header) columns."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[k]) for k, _ in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


SUMMARY_COLUMNS = (
    ("config", "config"),
    ("replica_hours", "replica-hours"),
    ("replicas_mean", "mean pods"),
    ("replicas_max", "max pods"),
    ("ttft_p50_s", "TTFT p50 s"),
    ("ttft_p95_s", "TTFT p95 s"),
    ("ttft_p99_s", "TTFT p99 s"),
    ("slo_attainment", "TTFT ≤ SLO"),
    ("slo_met", "p95 ≤ SLO"),
    ("scale_events", "scale events"),
)
HOURLY_COLUMNS = (
    ("hour", "hour"),
    ("offered_rps", "offered req/s"),
    ("served_rps", "served req/s"),
    ("replicas_mean", "mean pods"),
    ("replicas_max", "max pods"),
    ("ready_mean", "mean ready"),
    ("queue_mean", "mean queue"),
    ("queue_max", "max queue"),
    ("ttft_p95_s", "TTFT p95 s"),
    ("slo_attainment", "TTFT ≤ SLO"),
)
SIZING_COLUMNS = (
    ("load_x", "load"),
    ("peak_rps", "peak req/s"),
    ("burst_rps", "burst req/s"),
    ("model_pods_peak", "model pods, peak"),
    ("model_pods_burst", "model pods, burst"),
    ("model_cores_burst", "model cores, burst"),
    ("gateway_cores_burst", "gateway cores, burst"),
    ("redis_scripts_per_s_burst", "Redis scripts/s, burst"),
    ("redis_cores_burst", "Redis cores, burst"),
    ("usage_rows_per_s_burst", "usage rows/s, burst"),
    ("usage_rows_per_day", "usage rows/day"),
)


def report(args: argparse.Namespace, workload: Workload, replica: Replica, runs: Sequence[RunResult]) -> dict:
    """Everything the run found, as one JSON-able dict."""
    traffic, _, rules = build(args)
    mean_output = workload.mean_output or sum(traffic.output_tokens) / 2
    base = replace(traffic, peak_rps=args.peak_rps)  # sizing multiplies today's load, not --load-x's
    middle = sorted(args.targets)[len(args.targets) // 2]
    return {
        "command": "bench/capacity.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "sources": SOURCES,
        "assumptions": {
            "traffic": asdict(traffic),
            "replica": asdict(replica),
            "rules": {k: v for k, v in asdict(rules).items() if k not in ("metrics", "fixed", "initial")},
            "ttft_slo_s": args.ttft_slo_s,
        },
        "workload": {
            "requests": len(workload.arrival),
            "mean_prompt_tokens": round(float(workload.prompt.mean()), 1) if len(workload.prompt) else 0,
            "mean_output_tokens": round(mean_output, 1),
            "busiest_minute_rps": round(busiest_minute_rps(workload), 2),
            "bursts": [{"start_h": round(s / HOUR_S, 2), "minutes": d / 60} for s, d in workload.bursts],
        },
        "replica_at_target": [
            {
                "in_flight": t,
                "tok_s": round(replica.throughput(t), 1),
                "req_s": round(replica.capacity_rps(t, mean_output), 3),
            }
            for t in args.targets
        ],
        "summary": [r.summary(args.ttft_slo_s) for r in runs],
        "hourly": {r.label: r.hourly_rows(args.ttft_slo_s) for r in runs},
        "hourly_shown": runs[max(-len(runs), min(args.hourly, len(runs) - 1))].label if runs else None,
        "sizing": sizing(replica, base, mean_output, middle, (1, 10, 1000)),
    }


def print_report(result: dict) -> None:
    m = result["machine"]
    print(f"# capacity plan · {m['date']} · {m['cpu']}, {m['nproc']} cores · Python {m['python']}")
    print(f"command: {result['command']}\n")
    print("Defaults and their sources:")
    for key, text in result["sources"].items():
        print(f"  {key}: {text}")
    w = result["workload"]
    bursts = ", ".join(f"{b['start_h']:.2f} h" for b in w["bursts"]) or "none"
    print(
        f"\nworkload: {w['requests']:,} requests, mean prompt {w['mean_prompt_tokens']} / output "
        f"{w['mean_output_tokens']} tokens; bursts at {bursts}"
    )
    caps = ", ".join(
        f"{c['in_flight']:g}: {c['tok_s']} tok/s, {c['req_s']} req/s" for c in result["replica_at_target"]
    )
    print(f"one replica at each in-flight target: {caps}\n")
    print(f"## Configurations (TTFT SLO: p95 ≤ {result['assumptions']['ttft_slo_s']} s)\n")
    print(table(result["summary"], SUMMARY_COLUMNS))
    shown = result["hourly_shown"]
    if shown:
        print(f"\n## Hour by hour: {shown}\n")
        print(table(result["hourly"][shown], HOURLY_COLUMNS))
    print("\n## Steady-state sizing per tier (today's load x 1, 10, 1000; CPU replicas as measured)\n")
    print(table(result["sizing"], SIZING_COLUMNS))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    traffic, replica, rules = build(args)
    workload = make_workload(traffic, args.seed)
    middle = sorted(args.targets)[len(args.targets) // 2]
    runs = compare(workload, replica, rules, configurations(args, replica), args.fixed_replicas, middle)
    result = report(args, workload, replica, runs)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
