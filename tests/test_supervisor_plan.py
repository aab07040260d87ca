"""What `budrt serve` plans before starting anything: one endpoint per process, and the CPUs
split between the replicas of a server unless its threads are set."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from budrt.config import Settings
from budrt.control.supervisor import Supervisor


def _plan(home: Path, **server: object) -> Settings:
    settings = Settings(
        home=home, model_servers=[{"name": "text", "models": ["smollm2-135m-instruct"], **server}]
    )
    return Supervisor(settings).plan()


def test_replicas_split_the_cpus_and_one_process_keeps_torchs_default(tmp_path: Path) -> None:
    resolved = _plan(tmp_path / "two", replicas=2)
    (server,) = resolved.model_servers
    assert server.threads == max(1, (os.cpu_count() or 1) // 2)
    runtime = orjson.loads((tmp_path / "two" / "run" / "server-text.json").read_bytes())
    assert runtime["model_servers"][0]["threads"] == server.threads  # what each process reads
    (deployment,) = [d for d in resolved.deployments if d.model == "smollm2-135m-instruct"]
    assert len(deployment.endpoints) == 2 and deployment.managed
    assert _plan(tmp_path / "one").model_servers[0].threads is None
    assert _plan(tmp_path / "set", replicas=2, threads=3).model_servers[0].threads == 3
