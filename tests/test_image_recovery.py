"""An image model server in two replicas under load: SIGKILL one, no request is lost (the gateway
fails over before the first byte) and the supervisor brings it back with its model."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY
from tests.test_recovery import Serve, start_serve, stop_serve, wait_ready, wait_replaced

MODEL = "shapes-diffusion"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    home = tmp_path_factory.mktemp("image-recovery")
    config = {
        "models": [
            {
                "name": MODEL,
                "task": "image",
                "format": "diffusers",
                "source": "package:budrt/image/weights/shapes-diffusion",
                "default_steps": 4,
            }
        ],
        "model_servers": [{"name": "image", "models": [MODEL], "replicas": 2, "self_test_interval_s": 0}],
        "supervisor": {"probe_interval_s": 0.5, "probe_timeout_s": 1.0},
        "gateway": {"health_interval_s": 0.5, "retries": 3},
    }
    s = start_serve(home, config)
    wait_ready(s, 120)
    yield s
    stop_serve(s)


def generate(client: httpx.Client, url: str) -> int:
    body = {"model": MODEL, "prompt": "one small green square", "response_format": "b64_json"}
    try:
        return client.post(f"{url}/v1/images/generations", json=body).status_code
    except httpx.HTTPError:
        return -1


def test_sigkill_under_load_loses_no_image_request(serve: Serve) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(headers=headers, timeout=60) as client:
            while not stop.is_set() and len(statuses) < 2000:
                statuses.append(generate(client, serve.url))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        before = serve.replica("image-0")
        os.kill(before["pid"], signal.SIGKILL)
        after = wait_replaced(serve, "image-0", before["pid"], 60)
        time.sleep(0.5)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert after["restarts"] == before["restarts"] + 1
    assert {r["name"]: r["state"] for r in after["resident"]}.get(MODEL) == "ready", after
