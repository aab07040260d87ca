"""Load-balancing strategies and the circuit breaker, as units."""

from __future__ import annotations

import random
from collections import Counter

from budrt.config import DeploymentConfig
from budrt.gateway.balancer import HashRing, WeightedRoundRobin, affinity_key, p2c
from budrt.gateway.breaker import Breaker
from budrt.gateway.routing import Deployment


class R:
    def __init__(self, name: str, outstanding: int = 0) -> None:
        self.name = name
        self.outstanding = outstanding


def test_p2c_never_picks_the_most_loaded_of_two() -> None:
    rng = random.Random(1)
    reps = [R("a", 0), R("b", 5), R("c", 9)]
    picks = Counter(p2c(reps, rng).name for _ in range(3000))
    assert "c" not in picks  # c loses every pair it is in
    assert picks["a"] > picks["b"] > 0  # a wins both its pairs, b only against c


def test_weighted_round_robin_distribution() -> None:
    wrr = WeightedRoundRobin([5, 1, 1])
    picks = [wrr.pick([0, 1, 2]) for _ in range(70)]
    assert Counter(picks) == {0: 50, 1: 10, 2: 10}
    assert "00000" not in "".join(map(str, picks))  # smooth: the heavy one never takes a whole cycle
    # An unavailable replica's share goes to the others.
    assert set(wrr.pick([1, 2]) for _ in range(10)) == {1, 2}


def test_affinity_is_sticky_and_bounded() -> None:
    names = [f"http://r{i}" for i in range(4)]
    ring = HashRing(names)
    up = [True] * 4
    keys = [f"prompt {i}" for i in range(200)]
    first = {k: ring.pick(k, [0] * 4, up) for k in keys}
    assert all(ring.pick(k, [0] * 4, up) == first[k] for k in keys)  # same key, same replica
    assert len(set(first.values())) == 4  # keys spread over all replicas
    # Removing one replica only moves the keys that were on it.
    down = [True, False, True, True]
    moved = [k for k in keys if ring.pick(k, [0] * 4, down) != first[k]]
    assert moved and all(first[k] == 1 for k in moved)
    # Bounded load: a replica over 1.25x the mean is skipped, even for its own keys.
    hot = first[keys[0]]
    loads = [1] * 4
    loads[hot] = 10
    assert ring.pick(keys[0], loads, up) != hot
    # Simulated traffic, all one key: load still spreads, within the bound.
    loads = [0] * 4
    for _ in range(40):
        loads[ring.pick(keys[0], loads, up)] += 1
    assert max(loads) <= 1.25 * 40 / 4 + 1


def test_affinity_keys() -> None:
    chat = {"messages": [{"role": "system", "content": "S" * 300}, {"role": "user", "content": "u"}]}
    assert affinity_key(chat, "prefix") == "S" * 256
    assert affinity_key({"prompt": "abc"}, "prefix") == "abc"
    assert affinity_key({"user": "alice"}, "user") == "alice"
    assert affinity_key({}, "user") is None


def test_deployment_strategies() -> None:
    urls = [f"http://127.0.0.1:{9000 + i}/v1" for i in range(3)]
    dep = Deployment(DeploymentConfig(model="m", endpoints=urls, strategy="weighted_rr", weights=[2, 1, 1]))
    assert Counter(dep.pick().index for _ in range(40)) == {0: 20, 1: 10, 2: 10}
    dep = Deployment(DeploymentConfig(model="m", endpoints=urls, strategy="affinity"))
    assert len({dep.pick(None, "same prefix").index for _ in range(20)}) == 1
    dep = Deployment(DeploymentConfig(model="m", endpoints=urls))
    dep.endpoints[0].outstanding = 3
    dep.endpoints[1].outstanding = 1
    dep.endpoints[2].outstanding = 2
    assert dep.pick().index == 1
    assert dep.pick({dep.endpoints[1]}).index == 2  # tried replicas are skipped


def test_breaker_ejects_probes_and_readmits() -> None:
    b = Breaker("r", threshold=3, cooldown_s=1.0)
    b.failure(0.0)
    b.failure(0.1)
    assert b.allows(0.2) and not b.ejected  # below the threshold
    b.failure(0.2)
    assert b.ejected and not b.allows(0.5)  # ejected for the cooldown
    assert b.allows(1.3)  # half-open: one probe
    b.on_attempt(1.3)
    assert not b.allows(1.3)  # ...only one at a time
    b.failure(1.4)  # the probe failed: ejected again, twice as long
    assert not b.allows(3.0) and b.allows(3.5)
    b.on_attempt(3.5)
    b.success()  # the probe succeeded: readmitted
    assert not b.ejected and b.allows(3.6) and b.failures == 0
    b.failure(4.0, fatal=True)  # connection refused: ejected at once
    assert b.ejected
