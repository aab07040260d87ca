"""Property-based fuzz of the gateway's OpenAI and admin APIs, driven by its own `/openapi.json`.

A real gateway (over HTTP) in front of the mock upstream. schemathesis (its CLI, one run per
key) sends the document's examples, boundary values of every parameter (coverage phase) and
random valid and invalid requests (fuzzing phase) to every operation, with an admin key (so
authorization hides nothing) and with a viewer key; tests/fuzz_hooks.py keeps the fuzzing keys
alive and checks that no answer is a 500, tests/fuzz_schemathesis.toml mixes in edge values.
Deterministic generation and a fixed budget: the same requests on every run; a request may take
at most REQUEST_S. Afterwards the gateway must still be healthy and serve a normal request.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from starlette.routing import Mount

from budrt.config import DeploymentConfig, Settings
from budrt.gateway.app import create_app
from budrt.gateway.openapi import openapi
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.gateway.identity import CHAT, chat
from tests.mock_upstream import MockUpstream, ServerThread

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fuzz-model-7"  # the configured model
REQUEST_S = 10  # longer than this is a hang
# Per key: schemathesis phases and the fuzzing phase's examples per operation.
RUNS = {
    "admin": ("examples,coverage,fuzzing", 10),
    "viewer": ("fuzzing", 4),
}
OPERATIONS = [f"{m.upper()} {p}" for p, ops in openapi()["paths"].items() for m in ops]


@dataclass
class Fuzzed:
    url: str
    admin_key: str
    failures: dict[str, dict[str, str]]  # role -> operation -> what schemathesis reported


def _schemathesis(url: str, key: str, upstream: str, own_ids: str, role: str, report: Path) -> str:
    phases, examples = RUNS[role]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
        "FUZZ_UPSTREAM_URL": upstream,
        "FUZZ_MODEL": MODEL,
        "FUZZ_OWN_KEY_IDS": own_ids,
        "HYPOTHESIS_STORAGE_DIRECTORY": str(report.parent / "hypothesis"),  # not in the checkout
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        *(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(ROOT / "tests/fuzz_schemathesis.toml"),
        ),
        *("run", url + "/openapi.json", "--phases", phases, "--checks", "no_server_error"),
        # Deterministic generation (no seed, no randomness): the same requests on every run.
        *("--max-examples", str(examples), "--generation-deterministic", "--no-shrink"),
        *("--header", f"Authorization: Bearer {key}", "--request-timeout", str(REQUEST_S), "--workers", "1"),
        *(
            "--output-sanitize",
            "false",
            "--no-color",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
        ),
    ]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return done.stdout + done.stderr


def _failures(report: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problems = [f.text or f.get("message", "") for f in (*case.iter("failure"), *case.iter("error"))]
        if problems:
            out[case.get("name", "?")] = "\n".join(problems)
    return out


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    upstream = ServerThread(MockUpstream("up").app).start()
    home = tmp_path_factory.mktemp("fuzz")
    settings = Settings(
        home=home,
        secret_key="test-secret-test-secret",
        deployments=[DeploymentConfig(model=MODEL, endpoints=[upstream.url + "/v1"])],
        gateway={"health_interval_s": 0.5, "connect_timeout_s": 1.0},
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    keys = {role: store.create(f"fuzz-{role}", role=role) for role in RUNS}
    own_ids = ",".join(str(record.id) for _, record in keys.values())
    server = ServerThread(create_app(settings, key_store=store)).start()
    failures = {}
    try:
        for role, (key, _) in keys.items():
            report = home / f"junit-{role}.xml"
            output = _schemathesis(server.url, key, upstream.url + "/v1", own_ids, role, report)
            assert report.exists(), output[-3000:]
            failures[role] = _failures(report)
        yield Fuzzed(server.url, keys["admin"][0], failures)
    finally:
        server.stop()
        store.db.dispose()
        upstream.stop()


@pytest.mark.parametrize("role", list(RUNS))
@pytest.mark.parametrize("operation", OPERATIONS)
def test_no_5xx_no_hang(fuzzed: Fuzzed, operation: str, role: str) -> None:
    found = fuzzed.failures[role].get(operation)
    assert found is None, f"{operation} with the {role} key:\n{found}"


def test_every_operation_was_fuzzed(fuzzed: Fuzzed) -> None:
    unknown = {op for failures in fuzzed.failures.values() for op in failures} - set(OPERATIONS)
    assert not unknown, unknown  # e.g. a crash of the run itself, reported under another name


def test_gateway_healthy_after_the_fuzz(fuzzed: Fuzzed) -> None:
    assert requests.get(fuzzed.url + "/health/live", timeout=5).status_code == 200
    headers = {"Authorization": f"Bearer {fuzzed.admin_key}"}
    ok = requests.post(fuzzed.url + CHAT, json=chat(MODEL), headers=headers, timeout=10)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "hi"


def test_the_document_lists_every_route(tmp_path: Path) -> None:
    """Every route the app serves is in the document, and nothing else; the app serves it."""
    settings = Settings(home=tmp_path, secret_key="test-secret-test-secret")
    migrate(settings.database_url_resolved)
    app = create_app(settings)
    served = set()
    for route in app.routes:
        if isinstance(route, Mount):  # the web console: HTML pages, not part of the API
            continue
        path = route.path.replace(":int}", "}").replace(":path}", "}")  # type: ignore[attr-defined]
        served |= {f"{m} {path}" for m in route.methods or () if m != "HEAD"}  # type: ignore[attr-defined]
    assert served == set(OPERATIONS)
    server = ServerThread(app).start()
    try:
        assert requests.get(server.url + "/openapi.json", timeout=5).json() == openapi()
    finally:
        server.stop()
