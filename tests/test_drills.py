"""Failover drills: two zones on one machine behind a real load balancer, under steady load.

Zone A lives on 127.0.0.2, zone B on 127.0.0.3: each a budrt gateway (knowing its zone) and a
model server (a tiny real model), both gateways routing to both servers with their zones, sharing
one PostgreSQL (keys, usage) and one Redis (rate limits; zone A reaches it through a relay that a
drill cuts). HAProxy (Debian's) spreads clients over the gateways with health checks and retries
on a failed connection or an empty answer. Clients send non-streaming and streaming chat requests
throughout; each drill prints what was sent, served and failed, and the longest gap without an
answer.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from budrt.config import DeploymentConfig, Settings
from budrt.store.database import Database
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.pg_server import PostgresServer, require_postgres
from tests.procs import RedisServer, TcpRelay, free_port, require_part, start_gateway, stop
from tests.sse import sse_data
from tests.tiny_models import build_tiny_llama, start_server, tiny_config

INTERNAL = "internal-drill-credential-0123456789"
SECRET = "drill-secret-drill-secret"
MODEL = "tiny-drill"
CHAT = "/v1/chat/completions"
HOSTS = {"a": "127.0.0.2", "b": "127.0.0.3"}


@dataclass
class Zone:
    name: str
    host: str
    home: Path
    server_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    server: subprocess.Popen | None = None
    gateway: subprocess.Popen | None = None
    relay: TcpRelay | None = None  # this zone's path to Redis

    @property
    def zone(self) -> str:
        return f"zone-{self.name}"

    @property
    def server_url(self) -> str:
        return f"http://{self.host}:{self.server_port}"


@dataclass
class Platform:
    home: Path
    zones: dict[str, Zone]
    pg: PostgresServer
    redis: RedisServer
    model_dir: Path
    lb_url: str = ""
    lb: subprocess.Popen | None = None
    key: str = ""  # unlimited: never needs Redis
    limited: str = ""  # 20 requests a minute: counts must stay exact across gateways
    metered: str = ""  # a limit it never reaches: every request goes through Redis

    def start_server(self, z: Zone) -> None:
        model = tiny_config(MODEL, self.model_dir, max_num_seqs=16, preload=True)
        # One thread each: two servers busy at once on a 2-core machine must not oversubscribe it.
        args = {"host": z.host, "port": z.server_port, "self_test_interval_s": 0, "threads": 1}
        (z.home / "server").mkdir(parents=True, exist_ok=True)
        z.server, _ = start_server(z.home / "server", [model], internal_key=INTERNAL, **args)

    def settings(self, z: Zone) -> Settings:
        endpoints = [f"{zone.server_url}/v1" for zone in self.zones.values()]
        deployment = DeploymentConfig(
            model=MODEL,
            endpoints=endpoints,
            zones=[zone.zone for zone in self.zones.values()],
            api_key=INTERNAL,
            managed=True,  # health-checked: a dead server is out within a check, a revived one back in
        )
        assert z.relay is not None
        gateway = {
            "host": z.host,
            "redis_url": f"redis://127.0.0.1:{z.relay.port}/0",
            "health_interval_s": 0.2,
            "connect_timeout_s": 1.0,
            "breaker_cooldown_s": 1.0,
        }
        return Settings(
            home=z.home / "gateway",
            secret_key=SECRET,
            database_url=self.pg.url,
            zone=z.zone,
            gateway=gateway,
            deployments=[deployment],
            models=[],
            model_servers=[],
        )

    def start_gateway(self, z: Zone) -> None:
        z.gateway, _ = start_gateway(
            self.settings(z), z.home / f"gateway-{time.monotonic_ns()}.json", z.gateway_port
        )


_HAPROXY = """
global
    log stderr format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
    option http-buffer-request
    retry-on conn-failure empty-response response-timeout
frontend clients
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /health/live
    default-server inter 300ms fall 2 rise 1
{servers}
"""


def _start_haproxy(p: Platform) -> None:
    port = free_port()
    servers = "\n".join(f"    server {z.name} {z.host}:{z.gateway_port} check" for z in p.zones.values())
    config = p.home / "haproxy.cfg"
    config.write_text(_HAPROXY.format(port=port, servers=servers))
    p.lb = subprocess.Popen(["haproxy", "-f", str(config), "-db"], stderr=(p.home / "haproxy.log").open("wb"))
    p.lb_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(p.lb_url + "/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert p.lb.poll() is None and time.monotonic() < deadline, (p.home / "haproxy.log").read_text()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    require_part(
        shutil.which("haproxy") is not None, "no haproxy (the drills' load balancer): apt-get install haproxy"
    )
    require_postgres()
    home = tmp_path_factory.mktemp("drills")
    with PostgresServer() as pg:
        migrate(pg.url)
        redis = RedisServer().start()
        zones = {name: Zone(name, host, home / name) for name, host in HOSTS.items()}
        p = Platform(home, zones, pg, redis, build_tiny_llama(home / "tiny"))
        try:
            for z in zones.values():
                z.relay = TcpRelay(redis.port).start()
                p.start_server(z)
            for z in zones.values():
                p.start_gateway(z)
            _start_haproxy(p)
            db = Database(pg.url)
            keys = KeyStore(db, SECRET.encode())
            p.key, _ = keys.create("drills")
            p.limited, _ = keys.create("limited", rpm=20)
            p.metered, _ = keys.create("metered", rpm=1_000_000)
            db.dispose()
            yield p
        finally:
            for proc in (p.lb, *(z.gateway for z in zones.values()), *(z.server for z in zones.values())):
                if proc is not None:
                    stop(proc)
            for z in zones.values():
                if z.relay is not None:
                    z.relay.stop()
            redis.stop()


# -- load ------------------------------------------------------------------------------------------


def _body(stream: bool) -> dict[str, object]:
    tokens = 48 if stream else 4  # streams last long enough to be caught mid-way
    return {
        "model": MODEL,
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    }


@dataclass
class Load:
    """Non-streaming and streaming clients through the load balancer until stopped."""

    url: str
    key: str
    sent: int = 0
    served: int = 0
    failed: list[str] = field(default_factory=list)  # non-streaming: status or error
    # Non-streaming answers whose head had passed the load balancer when their gateway was killed:
    # it cannot retry what it began to forward (only a gateway kill can cause one).
    cut_answers: int = 0
    stream_errors: int = 0  # streams ended by an SSE error event (their server died)
    broken_streams: list[str] = field(default_factory=list)  # cut or hung: never acceptable
    answers: list[float] = field(default_factory=list)  # when each answer ended (monotonic)
    acted_at: float = 0.0  # when the drill's action ran (monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, plain: int = 4, streams: int = 2) -> Load:
        targets = [self._plain] * plain + [self._streams] * streams
        self._threads = [threading.Thread(target=t) for t in targets]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a client hung"

    @property
    def longest_gap_s(self) -> float:
        return self._longest_gap()[0]

    def _longest_gap(self) -> tuple[float, float]:
        """(its length, when it began relative to the drill's action)."""
        times = sorted(self.answers)
        gaps = [(b - a, a - self.acted_at) for a, b in zip(times, times[1:], strict=False)]
        return max(gaps, default=(0.0, 0.0))

    def report(self) -> str:
        return (
            f"sent {self.sent}, served {self.served}, failed {len(self.failed)}, answers cut "
            f"{self.cut_answers}, streams ended by an "
            f"error event {self.stream_errors}, streams cut {len(self.broken_streams)}, "
            f"longest gap {self._longest_gap()[0]:.2f} s (from {self._longest_gap()[1]:+.2f} s)"
        )

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def _plain(self) -> None:
        with self._client() as c:
            while not self._stop.is_set():
                try:
                    status = c.post(CHAT, json=_body(False)).status_code
                    outcome = "ok" if status == 200 else str(status)
                except httpx.RemoteProtocolError as exc:  # was the head of an answer sent?
                    outcome = "cut" if "complete message body" in str(exc) else type(exc).__name__
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self._record(outcome, stream=False)

    def _streams(self) -> None:
        with self._client() as c:
            while not self._stop.is_set():
                self._record(_one_stream(c), stream=True)

    def _record(self, outcome: str, stream: bool) -> None:
        with self._lock:
            self.sent += 1
            if outcome == "ok":
                self.served += 1
                self.answers.append(time.monotonic())
            elif stream and outcome == "error-event":
                self.stream_errors += 1
            elif stream:
                self.broken_streams.append(outcome)
            elif outcome == "cut":
                self.cut_answers += 1
            else:
                self.failed.append(outcome)


def _one_stream(c: httpx.Client) -> str:
    """ "ok" ([DONE] after content), "error-event" (an SSE event carrying "error"), else what broke."""
    try:
        with c.stream("POST", CHAT, json=_body(True)) as resp:
            if resp.status_code != 200:
                return str(resp.status_code)
            events = list(sse_data(resp))
    except httpx.HTTPError as exc:
        return type(exc).__name__
    try:
        if any(e != "[DONE]" and "error" in orjson.loads(e) for e in events):
            return "error-event"
    except orjson.JSONDecodeError:  # half an event reached the client
        return "cut"
    return "ok" if events and events[-1] == "[DONE]" else "cut"


def _metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _drill(
    p: Platform, name: str, action: object, seconds_after: float = 3.0, key: str | None = None
) -> Load:
    load = Load(p.lb_url, key or p.key).start()
    time.sleep(2.0)  # steady state first
    load.acted_at = time.monotonic()
    action()  # type: ignore[operator]
    time.sleep(seconds_after)
    load.stop()
    print(f"drill {name}: {load.report()}")
    return load


# -- drills ----------------------------------------------------------------------------------------


def test_sigkill_a_model_server(platform: Platform) -> None:
    a = platform.zones["a"]

    def kill() -> None:
        assert a.server is not None
        a.server.kill()

    load = _drill(platform, "SIGKILL zone A's model server", kill)
    try:
        assert load.failed == [] and load.cut_answers == 0, load.report()  # the gateways retried every one
        assert load.broken_streams == [], load.broken_streams  # cut streams said so; none hung
        assert load.served > 0 and load.longest_gap_s < 3.0
    finally:
        platform.start_server(a)


def test_sigkill_a_gateway(platform: Platform) -> None:
    a = platform.zones["a"]

    def kill() -> None:
        assert a.gateway is not None
        a.gateway.kill()

    load = _drill(platform, "SIGKILL zone A's gateway", kill)
    try:
        # HAProxy retried what reached the dead gateway. Streams it was relaying are cut, and so is
        # an answer whose head it had forwarded already: no process is left to finish them
        # (counted in the report, not asserted).
        assert load.failed == [], load.failed
        assert load.served > 0 and load.longest_gap_s < 3.0
        # Rate limits stay exact with one gateway left: its counter is Redis's, shared.
        with httpx.Client(
            base_url=platform.lb_url, headers={"Authorization": f"Bearer {platform.limited}"}
        ) as c:
            codes = [c.post(CHAT, json=_body(False), timeout=30).status_code for _ in range(30)]
        assert codes.count(200) == 20 and codes.count(429) == 10, codes
    finally:
        platform.start_gateway(a)


def test_zone_a_cut_off_from_redis(platform: Platform) -> None:
    a = platform.zones["a"]
    gateway_a = f"http://{a.host}:{a.gateway_port}"
    relay = a.relay
    assert relay is not None
    errors_before = _metric(gateway_a, "budrt_gateway_ratelimit_redis_errors_total")

    def cut() -> None:
        relay.stop()

    load = _drill(platform, "zone A partitioned from Redis", cut, key=platform.metered)
    try:
        # fail_mode "open" (the default): zone A's gateway admits by its local limiter, logs it,
        # counts it; nothing fails for want of Redis.
        assert load.failed == [] and load.broken_streams == [] and load.cut_answers == 0, load.report()
        assert load.served > 0 and load.longest_gap_s < 3.0
        assert _metric(gateway_a, "budrt_gateway_ratelimit_redis_errors_total") > errors_before
        logs = "".join(f.read_text() for f in (a.home).glob("gateway-*.log"))
        assert "rate-limit store unreachable; failing open" in logs
    finally:
        a.relay = TcpRelay(platform.redis.port, port=relay.port).start()


def test_whole_zone_down_then_back(platform: Platform) -> None:
    a = platform.zones["a"]
    server_metrics = {"Authorization": f"Bearer {INTERNAL}"}

    def zone_down() -> None:
        assert a.gateway is not None and a.server is not None
        a.gateway.kill()
        a.server.kill()

    load = _drill(platform, "zone A down", zone_down)
    assert load.failed == [], load.failed  # streams relayed by its gateway are cut (reported)
    assert load.served > 0 and load.longest_gap_s < 3.0
    back_at = time.monotonic()
    platform.start_server(a)
    platform.start_gateway(a)
    gateway_a = f"http://{a.host}:{a.gateway_port}"
    # Back: zone A's gateway sends to zone A's server again (no more spills), within seconds.
    headers = {"Authorization": f"Bearer {platform.key}"}
    deadline = time.monotonic() + 20
    while True:
        spills = _metric(gateway_a, "budrt_gateway_zone_spills_total")
        served_here = _metric(a.server_url, "budrt:request_success_total", server_metrics)
        httpx.post(gateway_a + CHAT, json=_body(False), headers=headers, timeout=30).raise_for_status()
        if _metric(gateway_a, "budrt_gateway_zone_spills_total") == spills and (
            _metric(a.server_url, "budrt:request_success_total", server_metrics) > served_here
        ):
            break
        assert time.monotonic() < deadline, "zone A's gateway did not return to its zone"
        time.sleep(0.2)
    print(f"\ndrill zone A back: local again {time.monotonic() - back_at:.1f} s after it restarted")
