"""Zone-aware routing: a gateway prefers replicas of its own zone (`zone`, BUDRT_ZONE) and spills
to other zones only when its local replicas are down, tried or busy past `gateway.zone_spill_at`;
model servers announce their zone in the heartbeat."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from budrt.config import DeploymentConfig, GatewayConfig, Settings
from budrt.control.status import model_spread
from budrt.gateway.metrics import ZONE_SPILLS
from budrt.gateway.replicas import ReplicaTable, parse_heartbeat, spread
from budrt.gateway.routing import Deployment, Endpoint, Router
from budrt.protocol.errors import APIError
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.gateway.identity import CHAT, chat
from tests.procs import start_gateway, start_upstream, stop

URLS = ["http://a1/v1", "http://a2/v1", "http://b1/v1", "http://b2/v1"]
ZONES = ["zone-a", "zone-a", "zone-b", "zone-b"]


def _deployment(zone: str | None = "zone-a", spill_at: int = 2, **extra: object) -> Deployment:
    config = DeploymentConfig(model=f"m-{time.monotonic_ns()}", endpoints=URLS, zones=ZONES, **extra)
    return Deployment(config, GatewayConfig(zone_spill_at=spill_at), zone=zone)


def _spills(dep: Deployment) -> float:
    return ZONE_SPILLS.labels(model=dep.name)._value.get()


def _fill(dep: Deployment, n: int) -> Counter[str]:
    """`n` requests picked and held in flight (none finishes): how many each zone took."""
    taken: Counter[str] = Counter()
    for _ in range(n):
        ep = dep.pick()
        assert ep is not None and ep.zone is not None
        ep.outstanding += 1
        taken[ep.zone] += 1
    return taken


@pytest.mark.parametrize("strategy", ["least_outstanding", "p2c", "weighted_rr"])
def test_local_replicas_take_everything_until_they_are_busy(strategy: str) -> None:
    dep = _deployment(spill_at=2, strategy=strategy)
    assert _fill(dep, 4) == {"zone-a": 4} and _spills(dep) == 0  # two local replicas, two each
    # Past 2 in flight on each local replica every zone is in rotation, by the strategy: the
    # least loaded fills the other zone up to the local level first.
    spilled = _fill(dep, 4)
    if strategy == "least_outstanding":
        assert spilled == {"zone-b": 4}
    assert spilled["zone-b"] > 0 and _spills(dep) == spilled["zone-b"]
    for ep in dep.endpoints:
        ep.outstanding = 0
    assert _fill(dep, 3) == {"zone-a": 3}


def test_a_zone_down_or_tried_spills_and_unknown_zones_count_as_remote() -> None:
    dep = _deployment()
    a1, a2, b1, _ = dep.endpoints
    assert dep.pick(tried={a1, a2}) in dep.endpoints[2:]  # a retry after both local ones failed
    a1.ready = a2.ready = False  # the whole local zone down
    assert {dep.pick().zone for _ in range(10)} == {"zone-b"}  # type: ignore[union-attr]
    assert _spills(dep) == 11
    unzoned = Deployment(DeploymentConfig(model="m-unzoned", endpoints=URLS[:2]), zone="zone-a")
    assert unzoned.pick() is not None and _spills(unzoned) == 0  # nothing local to prefer: no spill
    no_zone = _deployment(zone=None)
    assert {no_zone.pick().zone for _ in range(20)} >= {"zone-a"}  # type: ignore[union-attr]


def test_registered_replicas_bring_their_zone() -> None:
    router = Router([], GatewayConfig(), zone="zone-b")
    registry = ReplicaTable(router)
    for url, zone in (("http://10.0.0.1:8000/v1", "zone-a"), ("http://10.0.0.2:8000/v1", "zone-b")):
        registry.heartbeat(parse_heartbeat({"url": url, "models": ["m"], "zone": zone}))
    dep = router.resolve("m")
    assert dep is not None and dep.zone == "zone-b"
    assert [e.zone for e in dep.endpoints] == ["zone-a", "zone-b"]
    assert {dep.pick().base_url for _ in range(10)} == {"http://10.0.0.2:8000/v1"}  # type: ignore[union-attr]
    assert {row["url"]: row["zone"] for row in registry.listing()} == {
        "http://10.0.0.1:8000/v1": "zone-a",
        "http://10.0.0.2:8000/v1": "zone-b",
    }
    for bad in ("", "zone a", "-zone", "z" * 64, 7):
        with pytest.raises(APIError) as exc:
            parse_heartbeat({"url": "http://10.0.0.3/v1", "models": ["m"], "zone": bad})
        assert exc.value.status == 400 and exc.value.param == "zone"


def test_endpoint_zone_defaults_to_unknown() -> None:
    assert Endpoint("http://x/v1", False).zone is None
    dep = Deployment(DeploymentConfig(model="m-partial", endpoints=URLS, zones=["zone-a"]), zone="zone-a")
    assert [e.zone for e in dep.endpoints] == ["zone-a", None, None, None]


def test_the_spread_warns_where_one_failure_stops_a_model() -> None:
    deployments = [
        DeploymentConfig(model="lonely", endpoints=URLS[:1], zones=ZONES[:1]),
        DeploymentConfig(model="one-zone", endpoints=URLS[:2], zones=ZONES[:2]),
        DeploymentConfig(model="spread", endpoints=URLS, zones=ZONES, min_replicas_per_zone=2),
        DeploymentConfig(model="wants-more", endpoints=URLS[1:], zones=ZONES[1:], min_replicas_per_zone=2),
    ]
    router = Router(deployments, zone="zone-a")
    rows = {row["model"]: row for row in spread(router, time.monotonic())}
    assert rows["lonely"]["warnings"] == ["single point of failure: one replica"]
    assert rows["one-zone"]["zones"] == {"zone-a": 2}
    assert rows["one-zone"]["warnings"] == ["single point of failure: every replica is in zone zone-a"]
    assert rows["spread"] == {
        "model": "spread",
        "replicas": 4,
        "zones": {"zone-a": 2, "zone-b": 2},
        "warnings": [],
    }
    assert rows["wants-more"]["warnings"] == ["zone zone-a has 1 of the 2 replicas wanted"]
    router.resolve("spread").endpoints[0].ready = False  # type: ignore[union-attr]
    rows = {row["model"]: row for row in spread(router, time.monotonic())}
    assert rows["spread"]["warnings"] == ["zone zone-a has 1 of the 2 replicas wanted"]


@pytest.fixture
def two_zones() -> Iterator[tuple[list, list[str]]]:
    procs, urls = zip(*(start_upstream(name) for name in ("in-zone-a", "in-zone-b")), strict=True)
    yield list(procs), list(urls)
    for proc in procs:
        stop(proc)


def test_a_gateway_keeps_to_its_zone_and_fails_over_when_it_goes(
    tmp_path: Path, two_zones: tuple[list, list[str]]
) -> None:
    procs, urls = two_zones
    settings = Settings(
        home=tmp_path,
        secret_key="test-secret-test-secret",
        zone="zone-a",
        deployments=[DeploymentConfig(model="m", endpoints=urls, zones=["zone-a", "zone-b"])],
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("zones")
    admin, _ = store.create("ops", role="admin")
    gateway, url = start_gateway(settings, tmp_path / "runtime.json")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as c:
            served = Counter(c.post(CHAT, json=chat("m")).json()["served_by"] for _ in range(30))
            assert served == {"in-zone-a": 30}
            listing = c.get("/admin/replicas", headers={"Authorization": f"Bearer {admin}"}).json()
            assert listing["models"] == [
                {"model": "m", "replicas": 2, "zones": {"zone-a": 1, "zone-b": 1}, "warnings": []}
            ]
            stop(procs[0])  # zone A's replica goes
            replies = [c.post(CHAT, json=chat("m")) for _ in range(30)]
            assert [r.status_code for r in replies] == [200] * 30  # retried on zone B at once
            assert {r.json()["served_by"] for r in replies} == {"in-zone-b"}
            metrics = c.get("/metrics").text
        spills = [
            line
            for line in metrics.splitlines()
            if line.startswith('budrt_gateway_zone_spills_total{model="m"}')
        ]
        assert spills and float(spills[0].split()[-1]) >= 30
        assert 'budrt_gateway_model_in_flight_requests{model="m"} 0.0' in metrics
    finally:
        stop(gateway)
        store.db.dispose()


def test_budrt_status_warns_of_a_model_on_one_process() -> None:
    processes = [
        {"name": "gateway", "kind": "gateway", "state": "ready", "models": ["a", "b", "c"]},
        {"name": "text-0", "kind": "model-server", "state": "ready", "models": ["a"]},
        {"name": "text-1", "kind": "model-server", "state": "restarting", "models": ["a"]},
        {"name": "embed", "kind": "model-server", "state": "ready", "models": ["b"]},
        {"name": "embed-1", "kind": "model-server", "state": "ready", "models": ["b"]},
        {"name": "image", "kind": "model-server", "state": "failed", "models": ["c"]},
    ]
    assert model_spread(processes) == [
        {
            "model": "a",
            "replicas": 1,
            "processes": ["text-0"],
            "warnings": ["single point of failure: one model-server process (set replicas: 2)"],
        },
        {"model": "b", "replicas": 2, "processes": ["embed", "embed-1"], "warnings": []},
        {"model": "c", "replicas": 0, "processes": [], "warnings": ["no replica ready"]},
    ]
