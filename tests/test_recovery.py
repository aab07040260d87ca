"""Auto-recovery with real processes: a `budrt serve` whose chat model runs in two replicas.

SIGKILL one replica under steady load: the gateway fails over so no request fails, and the
supervisor brings the replica back (with the models it held) within 30 s. SIGSTOP one: the
supervisor's probe notices the hang and replaces it. A server whose watchdog finds it unhealthy
(a failing self-test) is restarted too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from budrt.control.status import platform_status
from tests.e2e.conftest import ADMIN_KEY, BUDRT, free_port
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-chat"


@dataclass
class Serve:
    url: str
    home: Path
    proc: subprocess.Popen[bytes]

    def status(self, cli: bool = False) -> dict:
        """What `budrt status --json` prints (in-process while polling: no interpreter start)."""
        if not cli:
            return platform_status(self.home)
        argv = [BUDRT, "status", "--json", "--home", str(self.home)]
        return json.loads(subprocess.run(argv, capture_output=True, timeout=30).stdout)

    def replica(self, name: str, cli: bool = False) -> dict:
        return next(p for p in self.status(cli)["processes"] if p["name"] == name)

    def log_tail(self) -> str:
        return "\n".join((self.home / "serve.log").read_text(errors="replace").splitlines()[-40:])


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    home = tmp_path_factory.mktemp("recovery")
    model_dir = build_tiny_llama(home / "tiny")
    config = {
        "models": [
            {
                "name": MODEL,
                "task": "chat",
                "format": "safetensors",
                "source": str(model_dir),
                "dtype": "float32",
                "max_model_len": 256,
                "max_num_seqs": 8,
                "kv_cache_bytes": 8 << 20,
                "preload": False,  # loaded by the first request; a restart must preload it
            }
        ],
        "model_servers": [{"name": "text", "models": [MODEL], "replicas": 2, "self_test_interval_s": 5}],
        "supervisor": {"probe_interval_s": 0.5, "probe_timeout_s": 1.0, "probe_failures_before_kill": 3},
        "gateway": {"health_interval_s": 0.5, "retries": 3},
    }
    s = start_serve(home, config)
    wait_ready(s, 90)
    yield s
    stop_serve(s)


def start_serve(
    home: Path,
    config: dict,
    env_extra: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
    port: int | None = None,
) -> Serve:
    """`budrt serve` with `config` in `home` (and `flags`, the gateway on `port` or a free one);
    does not wait for it to be ready."""
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDRT_")}
    env.update({"BUDRT_ADMIN_KEY": ADMIN_KEY, "HF_HUB_OFFLINE": "1", **(env_extra or {})})
    argv = [BUDRT, "serve", "--home", str(home), "--port", str(port), "--config", str(home / "config.yaml")]
    argv += flags
    with (home / "serve.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Serve(f"http://127.0.0.1:{port}", home, proc)


def wait_ready(s: Serve, limit_s: float) -> None:
    """Until the gateway's /health/ready answers 200 (the server must not exit meanwhile)."""
    deadline = time.time() + limit_s
    while True:
        assert s.proc.poll() is None, s.log_tail()
        try:
            if httpx.get(f"{s.url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, s.log_tail()
        time.sleep(0.3)


def stop_serve(s: Serve) -> None:
    s.proc.send_signal(signal.SIGTERM)
    try:
        s.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        s.proc.kill()


def chat(client: httpx.Client, url: str) -> int:
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    try:
        return client.post(f"{url}/v1/chat/completions", json=body).status_code
    except httpx.HTTPError as exc:
        return -1 if not isinstance(exc, httpx.TimeoutException) else -2


def wait_replaced(serve: Serve, name: str, old_pid: int, limit_s: float) -> dict:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        now = serve.replica(name)
        if now["pid"] != old_pid and now["state"] == "ready":
            return now
        time.sleep(0.3)
    raise AssertionError(f"{name} not back and ready within {limit_s}s:\n{serve.log_tail()}")


def test_sigkill_under_load_loses_no_request_and_the_replica_comes_back(serve: Serve) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        assert chat(client, serve.url) == 200  # loads the model on whichever replica answered
        assert chat(client, serve.url) == 200
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(headers=headers, timeout=30) as client:
            while not stop.is_set() and len(statuses) < 5000:
                statuses.append(chat(client, serve.url))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        before = serve.replica("text-0")
        killed_at = time.time()
        os.kill(before["pid"], signal.SIGKILL)
        wait_replaced(serve, "text-0", before["pid"], 30)
        back_in = time.time() - killed_at
        after = serve.replica("text-0", cli=True)
        time.sleep(0.5)  # keep the load on while the gateway takes it back into rotation
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=40)
    assert back_in < 30
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert after["restarts"] == before["restarts"] + 1
    assert "exited" in (after["last_error"] or "")
    # The model it held before the kill was preloaded by the new process.
    resident = {r["name"]: r for r in after["resident"]}
    assert resident.get(MODEL, {}).get("state") == "ready", after
    assert resident[MODEL]["memory_bytes"] > 0


def test_sigstop_hang_is_detected_and_replaced(serve: Serve) -> None:
    before = serve.replica("text-1")
    os.kill(before["pid"], signal.SIGSTOP)
    try:
        wait_replaced(serve, "text-1", before["pid"], 30)
        after = serve.replica("text-1", cli=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(before["pid"], signal.SIGCONT)  # if it is somehow still there, let it exit
    assert after["restarts"] == before["restarts"] + 1
    assert "health probe" in (after["last_error"] or "")
    with httpx.Client(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) as client:
        assert [chat(client, serve.url) for _ in range(4)] == [200] * 4


def test_watchdog_flags_a_stuck_engine_and_a_failing_self_test(tmp_path: Path) -> None:
    """A real engine whose step thread is held (fault injected into `step`): the watchdog notices."""
    import asyncio

    from budrt.config import ModelConfig
    from budrt.engine.interface import SamplingParams
    from budrt.server.model_pool import ModelPool
    from budrt.server.watchdog import Watchdog

    cfg = ModelConfig(
        name="w",
        task="chat",
        format="safetensors",
        source=str(build_tiny_llama(tmp_path / "w")),
        max_model_len=128,
        max_num_seqs=2,
        kv_cache_bytes=4 << 20,
    )

    async def scenario() -> None:
        pool = ModelPool([cfg])
        hosted = await pool.acquire("w", "chat")
        engine = hosted.engine
        assert engine is not None
        watchdog = Watchdog(pool, step_timeout_s=0.3, self_test_interval_s=0)
        await watchdog.self_test()
        watchdog.check_progress(time.monotonic())
        assert watchdog.healthy
        gate, step = threading.Event(), engine.step  # type: ignore[attr-defined]
        engine.step = lambda: (gate.wait(10), step())  # type: ignore[attr-defined]
        await watchdog.self_test()  # an idle engine that cannot produce one token
        assert not watchdog.healthy and "self-test failed" in (watchdog.error or "")
        outputs = engine.generate("r1", [5, 6, 7], SamplingParams(max_tokens=2))
        pending = asyncio.ensure_future(anext(outputs))
        for _ in range(8):
            await asyncio.sleep(0.1)
            watchdog.check_progress(time.monotonic())
        assert "no engine step completed" in (watchdog.stall_error or "")
        gate.set()
        await pending
        await outputs.aclose()
        watchdog.step_timeout_s = 30.0  # a loaded CI machine may be slow; it must not be stuck
        watchdog.check_progress(time.monotonic())
        await watchdog.self_test()
        assert watchdog.healthy
        pool.release(hosted)
        await pool.close()

    asyncio.run(scenario())


def test_unhealthy_server_is_restarted_by_the_supervisor(tmp_path: Path) -> None:
    """The watchdog's self-test fails (test fault from the environment, read at start), the
    server answers "unhealthy", and after `unhealthy_before_restart` such answers the supervisor
    replaces it."""
    config = {
        "models": [
            {
                "name": MODEL,
                "task": "chat",
                "format": "safetensors",
                "source": str(build_tiny_llama(tmp_path / "tiny")),
                "dtype": "float32",
                "max_model_len": 128,
                "max_num_seqs": 2,
                "kv_cache_bytes": 4 << 20,
            }
        ],
        "model_servers": [
            {"name": "sick", "models": [MODEL], "watchdog_interval_s": 0.2, "self_test_interval_s": 0.2}
        ],
        "supervisor": {"probe_interval_s": 0.3, "unhealthy_before_restart": 2, "restart_backoff_s": 0.2},
    }
    s = start_serve(tmp_path, config, {"BUDRT_TEST_FAULT": "self_test_fail"})
    try:
        deadline = time.time() + 60
        first = None
        while first is None or first["pid"] is None:  # the supervisor has started it
            assert s.proc.poll() is None and time.time() < deadline, s.log_tail()
            first = next((p for p in s.status()["processes"] if p["name"] == "sick"), None)
            time.sleep(0.2)
        assert first["restarts"] == 0
        started = time.time()
        while True:  # import, preload, a failed self-test, two unhealthy answers, backoff
            now = s.replica("sick")
            if now["restarts"] >= 1 and now["pid"] != first["pid"]:
                break
            assert time.time() - started < 45, (now, s.log_tail())
            time.sleep(0.2)
    finally:
        stop_serve(s)
    # Polled faster than the new (just as sick) process can load, fail and be replaced again.
    assert now["restarts"] == first["restarts"] + 1, now
    assert (now["last_error"] or "").startswith("unhealthy: model tiny-chat: self-test failed")
    assert "BUDRT_TEST_FAULT" in now["last_error"]


def _processes_mentioning(text: str) -> list[int]:
    """pids whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


def test_model_servers_start_before_the_store_and_stop_if_it_cannot_be_prepared(tmp_path: Path) -> None:
    """`budrt serve` starts the model servers while it migrates the metadata DB (their start-up
    takes seconds); when preparing the store fails (an admin key no gateway would accept), it
    exits with the error and leaves no model server behind."""
    model_dir = build_tiny_llama(tmp_path / "tiny")
    model = {"name": MODEL, "task": "chat", "format": "safetensors", "source": str(model_dir)}
    config = {"models": [model], "model_servers": [{"name": "text", "models": [MODEL]}]}
    s = start_serve(tmp_path, config, {"BUDRT_ADMIN_KEY": "my-admin-key-123"})
    try:
        assert s.proc.wait(timeout=60) == 2
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    log = (tmp_path / "serve.log").read_text()
    assert "started text" in log and "BUDRT_ADMIN_KEY" in log and "started gateway" not in log
    assert _processes_mentioning(str(tmp_path / "run")) == []
