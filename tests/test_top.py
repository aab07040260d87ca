"""`budrt top`: per model, replicas, in flight and rates from a running gateway's /metrics and
/admin/replicas (a real gateway over HTTP, a mock upstream)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from budrt.cli.app import app
from budrt.cli.top import snapshot
from tests.gateway.identity import CHAT, chat, settings, start
from tests.mock_upstream import MockUpstream, ServerThread


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ServerThread(MockUpstream("up").app).start()
    yield server.url + "/v1"
    server.stop()


def test_top_shows_rates_replicas_and_warnings(tmp_path: Path, upstream: str) -> None:
    g = start(settings(tmp_path, upstream, ["m"]))
    admin, _ = g.store.create("ops", role="admin")
    user, _ = g.store.create("app")
    stop = threading.Event()

    def load() -> None:
        with g.client(user) as c:
            for _ in range(2000):
                if stop.is_set():
                    return
                c.post(CHAT, json=chat("m")).raise_for_status()

    worker = threading.Thread(target=load)
    worker.start()
    try:
        with httpx.Client(base_url=g.url, headers={"Authorization": f"Bearer {admin}"}) as client:
            # Other gateways of this test process counted into the same registry: "m" is ours.
            row = {r["model"]: r for r in snapshot(client, 0.5)}["m"]
        result = CliRunner().invoke(
            app,
            [
                "top",
                "--once",
                "--json",
                "--url",
                g.url,
                "--key",
                admin,
                "--interval",
                "0.3",
                "--home",
                str(tmp_path),
            ],
        )
        viewer, _ = g.store.create("viewer", role="viewer")
        refused = CliRunner().invoke(
            app, ["top", "--once", "--url", g.url, "--key", viewer, "--home", str(tmp_path)]
        )
    finally:
        stop.set()
        worker.join()
        g.stop()
    assert row["model"] == "m" and row["replicas"] == 1 and row["requests_per_s"] > 0
    assert row["tokens_per_s"] > 0 and row["errors_per_s"] == 0
    assert row["warnings"] == ["single point of failure: one replica"]
    assert result.exit_code == 0, result.output
    cli_row = {r["model"]: r for r in json.loads(result.output)}["m"]
    assert cli_row["model"] == "m" and cli_row["requests_per_s"] > 0
    assert refused.exit_code != 0 and "/admin/replicas: HTTP 403" in refused.output
