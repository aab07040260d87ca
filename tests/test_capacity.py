"""bench/capacity.py: the HPA step against Kubernetes' formula, and the simulator's logic.

Fast (a few simulated hours at most), and nothing here depends on how fast this machine is.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parent.parent / "bench" / "capacity.py"
_spec = importlib.util.spec_from_file_location("capacity", PATH)
capacity = importlib.util.module_from_spec(_spec)
sys.modules["capacity"] = capacity  # dataclasses look their module up by name
_spec.loader.exec_module(capacity)

Metric, Rules, Hpa, Replica = capacity.Metric, capacity.Rules, capacity.Hpa, capacity.Replica
metric_replicas = capacity.metric_replicas
INFLIGHT_8 = (Metric("inflight", 8.0),)


def flat(pods: int, value: float) -> dict[str, list[float | None]]:
    """Every pod reporting the same in-flight value."""
    return {"inflight": [value] * pods}


# ---------------------------------------------------------------- the HPA step


def test_desired_is_ceil_of_current_times_ratio_outside_the_tolerance() -> None:
    assert metric_replicas([12.0, 12.0], 0, 2, 8.0, 0.1) == 3  # ceil(2 x 12/8)
    assert metric_replicas([10.0] * 3, 0, 3, 4.0, 0.1) == 8  # ceil(7.5)
    assert metric_replicas([2.0] * 4, 0, 4, 8.0, 0.1) == 1  # ceil(4 x 0.25)
    assert metric_replicas([0.0] * 4, 0, 4, 8.0, 0.1) == 0  # minReplicas is applied later


def test_within_the_tolerance_nothing_changes() -> None:
    assert metric_replicas([8.7, 8.7], 0, 2, 8.0, 0.1) == 2  # ratio 1.0875
    assert metric_replicas([7.3, 7.3], 0, 2, 8.0, 0.1) == 2  # ratio 0.9125
    assert metric_replicas([9.0, 9.0], 0, 2, 8.0, 0.1) == 3  # ratio 1.125: outside


def test_missing_and_pending_pods_damp_the_change_as_kubernetes_does() -> None:
    assert metric_replicas([None, None], 0, 2, 8.0, 0.1) is None  # no metric: no scaling
    # Scale-up: a pod not yet scraped counts as 0: (24 + 0) / 2 / 8 = 1.5 -> ceil(3).
    assert metric_replicas([24.0, None], 0, 2, 8.0, 0.1) == 3
    # ... and may cancel it: (16 + 0) / 2 / 8 = 1.0, within the tolerance.
    assert metric_replicas([16.0, None], 0, 2, 8.0, 0.1) == 2
    # Scale-down: a missing pod counts at the target: (2 + 2 + 2 + 8) / 4 / 8 -> ceil(1.75).
    assert metric_replicas([2.0, 2.0, 2.0, None], 0, 4, 8.0, 0.1) == 2
    # A Pending pod counts as 0 on a scale-up only: (16 + 0) / 2 / 8 = 1.0.
    assert metric_replicas([16.0], 1, 2, 8.0, 0.1) == 2
    assert metric_replicas([2.0], 1, 2, 8.0, 0.1) == 1


def test_scale_up_rate_policies_double_or_add_four_per_period() -> None:
    hpa = Hpa(Rules(metrics=INFLIGHT_8, max_replicas=1000))
    counts, current = [], 2
    for now in range(0, 60, 15):
        current = hpa.reconcile(now, current, flat(current, 1000.0), 0)
        counts.append(current)
    assert counts == [6, 12, 24, 48]  # max(+4, +100%) of the count at each period's start
    # Within one period the limit counts what it already added: no second step at t = 50.
    assert hpa.reconcile(50, 48, flat(48, 1000.0), 0) == 48
    # Three pods wanting 8 get 7: +4 beats +100% (6) below four pods.
    assert Hpa(Rules(metrics=(Metric("inflight", 4.0),))).reconcile(0, 3, flat(3, 10.0), 0) == 7
    # max_replicas caps it.
    assert Hpa(Rules(metrics=INFLIGHT_8, max_replicas=5)).reconcile(0, 2, flat(2, 1000.0), 0) == 5


def test_scale_down_waits_for_the_stabilization_window() -> None:
    hpa = Hpa(Rules(metrics=INFLIGHT_8))  # down window 300 s
    assert hpa.reconcile(0, 10, flat(10, 8.0), 0) == 10  # proposal 10 recorded
    for now in range(15, 300, 15):
        assert hpa.reconcile(now, 10, flat(10, 1.6), 0) == 10  # proposal 2, held by the 10 at t=0
    assert hpa.reconcile(300, 10, flat(10, 1.6), 0) == 2  # t=0 left the window (strictly after)


def test_scale_up_window_takes_the_lowest_recent_proposal() -> None:
    hpa = Hpa(Rules(metrics=INFLIGHT_8, up_window_s=60, max_replicas=100))
    assert hpa.reconcile(0, 2, flat(2, 16.0), 0) == 4
    assert hpa.reconcile(15, 4, flat(4, 20.0), 0) == 4  # proposal 10, held by the 4 at t=0
    for now in (30, 45):
        assert hpa.reconcile(now, 4, flat(4, 20.0), 0) == 4
    assert hpa.reconcile(60, 4, flat(4, 20.0), 0) == 8  # only 10s in the window; +4 per period


def test_several_metrics_take_the_largest_proposal() -> None:
    rules = Rules(metrics=(Metric("tokens", 100.0), Metric("waiting", 2.0)), max_replicas=100)
    samples = {"tokens": [100.0] * 4, "waiting": [6.0] * 4}  # tokens: keep 4; waiting: 12
    assert Hpa(rules).reconcile(0, 4, samples, 0) == 8  # 12, limited to +100% in 15 s
    samples = {"tokens": [50.0] * 4, "waiting": [0.0] * 4}
    assert Hpa(rules).reconcile(0, 4, samples, 0) == 2


# ---------------------------------------------------------------- the replica model


def test_throughput_is_the_measured_points_and_flat_beyond() -> None:
    replica = Replica()
    assert replica.throughput(1) == pytest.approx(95.1)
    assert replica.throughput(16) == pytest.approx(182.0)
    assert replica.throughput(64) == pytest.approx(245.0)
    assert replica.throughput(4) == pytest.approx((95.1 + 182.0) / 2)  # halfway in log2
    assert replica.throughput(500) == pytest.approx(245.0)
    assert replica.throughput(0.3) == pytest.approx(95.1)


# ---------------------------------------------------------------- the simulation


def steady(rate: float, hours: float = 1.5, seed: int = 3) -> object:
    traffic = capacity.Traffic(peak_rps=rate, trough=1.0, bursts_per_day=0, hours=hours)
    return capacity.make_workload(traffic, seed)


def last_half_hour(run: object) -> np.ndarray:
    return run.pods[-1800:]


@pytest.mark.parametrize("n", [3, 6])
def test_constant_load_at_n_replicas_capacity_converges_to_n(n: int) -> None:
    # A metric linear in the load: output tok/s per pod, on the measured CPU curve.
    tokens = 160.0
    workload = steady(n * tokens / 144.0)  # 144: the mean output of 32-256 tokens
    rules = Rules(metrics=(Metric("tokens", tokens),), initial=1)
    pods = last_half_hour(capacity.Simulation(workload, Replica(), rules, "t").run())
    assert n <= pods.min() and pods.max() <= n + 1

    # In flight per pod, where batching is linear (each request's speed independent of the
    # batch, as on an accelerator that is not yet compute-bound): in flight is linear in load too.
    linear = Replica(tok_s=tuple((float(2**k), 20.0 * 2**k) for k in range(7)))
    workload = steady(n * linear.capacity_rps(8.0, 144.0))
    run = capacity.Simulation(workload, linear, Rules(metrics=INFLIGHT_8, initial=1), "i").run()
    assert n <= last_half_hour(run).mean() <= n + 1


def test_in_flight_on_the_cpu_curve_swings_where_tokens_do_not() -> None:
    """The measured CPU replica batches weakly (95 -> 182 tok/s from 1 to 16 in flight), so in
    flight per pod grows much faster than the load: the proportional step overshoots both ways."""
    workload = steady(6 * Replica().capacity_rps(8.0, 144.0))
    run = capacity.Simulation(workload, Replica(), Rules(metrics=INFLIGHT_8, initial=6), "i").run()
    tokens = Rules(metrics=(Metric("tokens", Replica().throughput(8.0)),), initial=6)
    steady_run = capacity.Simulation(workload, Replica(), tokens, "t").run()
    spread = np.ptp(last_half_hour(run))
    assert spread >= 3 and spread > np.ptp(last_half_hour(steady_run))
    assert run.scale_events > 2 * steady_run.scale_events


@pytest.mark.parametrize("pod_start_s", [0.0, 20.0])
def test_from_zero_the_first_request_waits_for_the_load(pod_start_s: float) -> None:
    workload = capacity.Workload(np.array([100.3]), np.array([200]), np.array([50]), duration_s=900)
    replica = Replica(pod_start_s=pod_start_s)
    rules = Rules(metrics=INFLIGHT_8, min_replicas=0, initial=0)
    run = capacity.Simulation(workload, replica, rules, "zero").run()
    assert run.pods[:100].max() == 0
    assert run.ttft[0] >= replica.load_s + pod_start_s
    # KEDA's poll at 120 s starts the pod; it serves at 128.4 s (+ the Pending time) and the
    # request starts in the next 1 s step.
    assert run.ttft[0] == pytest.approx(
        math.ceil(120 + pod_start_s + replica.load_s) - 100.3 + 200 / 619 + 1 / 95.1
    )
    # Back to zero after KEDA's cooldown with nothing in flight.
    assert run.pods[-1] == 0 and run.pods.max() == 1


def test_a_higher_target_costs_fewer_replica_hours_and_a_worse_ttft() -> None:
    traffic = capacity.Traffic(hours=6, peak_hour=3, bursts_per_day=8)  # 2 bursts
    workload = capacity.make_workload(traffic, 0)
    runs = {
        t: capacity.Simulation(workload, Replica(), Rules(metrics=(Metric("inflight", t),)), str(t)).run()
        for t in (4.0, 16.0)
    }
    low, high = runs[4.0].summary(1.0), runs[16.0].summary(1.0)
    assert high["replica_hours"] < low["replica_hours"]
    assert high["ttft_p95_s"] > low["ttft_p95_s"]
    assert high["slo_attainment"] < low["slo_attainment"]


def test_the_same_seed_gives_the_same_day() -> None:
    traffic = capacity.Traffic(hours=2, bursts_per_day=24)
    a, b = capacity.make_workload(traffic, 7), capacity.make_workload(traffic, 7)
    assert np.array_equal(a.arrival, b.arrival) and np.array_equal(a.output, b.output)
    assert a.bursts == b.bursts
    run_a = capacity.Simulation(a, Replica(), Rules(), "a").run()
    run_b = capacity.Simulation(b, Replica(), Rules(), "b").run()
    assert np.array_equal(run_a.ttft, run_b.ttft) and np.array_equal(run_a.pods, run_b.pods)
    assert not np.array_equal(capacity.make_workload(traffic, 8).arrival[:50], a.arrival[:50])


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert capacity.main(["--hours", "0.5", "--json", "--targets", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    labels = [row["config"] for row in result["summary"]]
    assert labels[0] == "HPA in flight 8" and labels[-1].startswith("fixed")
    assert {"machine", "sources", "assumptions", "hourly", "sizing"} <= result.keys()
    assert result["machine"]["cpu"]
    assert [row["load_x"] for row in result["sizing"]] == [1, 10, 1000]
