"""Secrets of a real `budrt serve`: private files, what each child process receives.

The home is made 0755 and its files 0644 beforehand (an older budrt, a copy, another umask):
after the start every directory is 0700 and every private file 0600. A model server gets only
the secrets it needs (its runtime file read from its own command line), no child inherits the
`BUDRT_*` secrets of the supervisor's environment, the model server answers 401 to a caller
without the run's internal key while the gateway and `budrt status` still reach it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from budrt.store.db import make_engine, migrate
from tests.e2e.conftest import ADMIN_KEY, BUDRT
from tests.test_recovery import Serve, start_serve, stop_serve, wait_ready
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-secrets"
JWT_SECRET = "jwt-secret-0123456789-0123456789-abcdef"
UPSTREAM_KEY = "sk-upstream-0123456789abcdef"
DATABASE_URL_ENV = "BUDRT_DATABASE_URL"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    home = tmp_path_factory.mktemp("secrets")
    model_dir = build_tiny_llama(home / "tiny")
    for path, content in {
        "secret.key": os.urandom(32),
        "admin.key": b"stale\n",
        "budrt.db": b"",  # an empty file is an empty SQLite database (and empty -wal/-shm files fit)
        "budrt.db-wal": b"",
        "budrt.db-shm": b"",
        "run/runtime.json": b"{}",
        "run/status.json": b"{}",
    }.items():
        (home / path).parent.mkdir(exist_ok=True)
        (home / path).write_bytes(content)
        os.chmod(home / path, 0o644)
    os.chmod(home / "run", 0o755)
    os.chmod(home, 0o755)
    config = {
        "models": [
            {
                "name": MODEL,
                "task": "chat",
                "format": "safetensors",
                "source": str(model_dir),
                "dtype": "float32",
                "max_model_len": 128,
                "kv_cache_bytes": 4 << 20,
                "preload": False,
            }
        ],
        "model_servers": [{"name": "text", "models": [MODEL], "self_test_interval_s": 0}],
        "deployments": [
            {"model": "external", "endpoints": ["http://127.0.0.1:9/v1"], "api_key": UPSTREAM_KEY}
        ],
        "supervisor": {"probe_interval_s": 0.5},
        "gateway": {"health_interval_s": 0.5},
    }
    env = {"BUDRT_AUTH__JWT__SECRET": JWT_SECRET, DATABASE_URL_ENV: f"sqlite:///{home / 'budrt.db'}"}
    s = start_serve(home, config, env)
    wait_ready(s, 120)
    yield s
    stop_serve(s)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _proc(pid: int, what: str) -> list[str]:
    return Path(f"/proc/{pid}/{what}").read_bytes().decode().split("\0")


def _children(serve: Serve) -> dict[str, dict]:
    return {p["kind"]: p for p in serve.status()["processes"]}


def test_home_run_and_private_files_are_narrowed(serve: Serve) -> None:
    home = serve.home
    assert _mode(home) == 0o700 and _mode(home / "run") == 0o700
    private = [home / "secret.key", home / "admin.key", home / "budrt.db"]
    private += list(home.glob("budrt.db-*"))  # -wal/-shm, while SQLite keeps them
    private += [p for p in (home / "run").iterdir() if p.is_file() and not p.name.startswith(".")]
    assert {p.name for p in (home / "run").iterdir()} >= {"runtime.json", "server-text.json", "internal.key"}
    assert {str(p): oct(_mode(p)) for p in private} == {str(p): "0o600" for p in private}


def test_sqlite_files_made_wider_before_are_narrowed(tmp_path: Path) -> None:
    db = tmp_path / "meta.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").write_bytes(b"")
        os.chmod(f"{db}{suffix}", 0o644)
    migrate(f"sqlite:///{db}")
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:  # the database opens and its WAL is in use
            assert conn.exec_driver_sql("SELECT count(*) FROM api_keys").scalar() == 0
            modes = {p.name: oct(_mode(p)) for p in tmp_path.iterdir()}
    finally:
        engine.dispose()
    assert modes == {"meta.db": "0o600", "meta.db-wal": "0o600", "meta.db-shm": "0o600"}


def test_a_model_server_receives_only_the_secrets_it_needs(serve: Serve) -> None:
    server = _children(serve)["model-server"]
    argv = " ".join(_proc(server["pid"], "cmdline")).split()  # a spare's is one string: control/spare.py
    runtime = json.loads(Path(argv[argv.index("--runtime") + 1]).read_bytes())
    assert runtime["secret_key"] is None and runtime["admin_key"] is None
    assert runtime["auth"]["jwt"]["secret"] is None
    assert runtime["deployments"] == [] and runtime["gateway"]["redis_url"] is None
    assert runtime["database_url"] is None  # its model is a path, not from the model registry
    assert runtime["internal_key"] == (serve.home / "run" / "internal.key").read_text()
    text = json.dumps(runtime)
    assert JWT_SECRET not in text and UPSTREAM_KEY not in text and ADMIN_KEY not in text


def test_no_child_inherits_secrets_by_environment_or_command_line(serve: Serve) -> None:
    for child in _children(serve).values():
        env = _proc(child["pid"], "environ")
        names = {e.split("=", 1)[0] for e in env}
        assert not names & {"BUDRT_ADMIN_KEY", "BUDRT_AUTH__JWT__SECRET", DATABASE_URL_ENV}, child["name"]
        seen = " ".join(env + _proc(child["pid"], "cmdline"))
        internal = (serve.home / "run" / "internal.key").read_text()
        for secret in (JWT_SECRET, ADMIN_KEY, UPSTREAM_KEY, internal):
            assert secret not in seen, child["name"]


def test_the_model_server_answers_only_holders_of_the_internal_key(serve: Serve) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert (
        httpx.post(f"{serve.url}/v1/chat/completions", json=body, headers=headers, timeout=60).status_code
        == 200
    )
    server = _children(serve)["model-server"]
    # The gateway's admin key is no credential at a model server; the run's internal key is.
    direct = httpx.post(f"{server['url']}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert direct.status_code == 401 and direct.json()["error"]["code"] == "invalid_api_key"
    internal = (serve.home / "run" / "internal.key").read_text()
    auth = {"Authorization": f"Bearer {internal}"}
    assert httpx.get(f"{server['url']}/v1/models", headers=auth, timeout=30).status_code == 200
    # `budrt status` still reads the server's readiness (with the key) and prints no secret.
    out = subprocess.run(
        [BUDRT, "status", "--json", "--home", str(serve.home)], capture_output=True, text=True, timeout=30
    ).stdout
    status = {p["kind"]: p for p in json.loads(out)["processes"]}
    assert status["model-server"]["health"]["ready"] is True
    assert [r["name"] for r in status["model-server"]["resident"]] == [MODEL]
    for secret in (internal, ADMIN_KEY, JWT_SECRET, UPSTREAM_KEY):
        assert secret not in out
