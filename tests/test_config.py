"""The settings tree: defaults, YAML, BUDRT_* environment, CLI overrides, masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from budrt.config import Settings, load_runtime, load_settings, runtime_dump


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("BUDRT_"):
            monkeypatch.delenv(name)


def test_defaults_name_the_packaged_models(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path)
    assert [m.name for m in s.models] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert s.gateway.port == 8000
    assert s.database_url_resolved == f"sqlite:///{tmp_path / 'budrt.db'}"


def test_yaml_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "budrt.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"port": 9100, "retries": 5},
                "deployments": [{"model": "mock", "endpoints": ["http://127.0.0.1:9000/v1"]}],
            }
        )
    )
    s = load_settings(config, home=tmp_path)
    assert (s.gateway.port, s.gateway.retries) == (9100, 5)
    assert s.deployments[0].model == "mock" and s.deployments[0].endpoints == ["http://127.0.0.1:9000/v1"]
    monkeypatch.setenv("BUDRT_GATEWAY__PORT", "9200")
    assert load_settings(config, home=tmp_path).gateway.port == 9200
    s = load_settings(config, home=tmp_path, gateway={"port": 9300, "host": None})
    assert s.gateway.port == 9300 and s.gateway.retries == 5  # a flag changes one key, not the section


def test_config_via_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("log_level: debug\n")
    monkeypatch.setenv("BUDRT_CONFIG", str(config))
    monkeypatch.setenv("BUDRT_HOME", str(tmp_path / "h"))
    s = Settings()
    assert s.log_level == "debug" and s.home == tmp_path / "h"


def test_invalid_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model_servers": [{"name": "x", "models": ["nope"]}]}))
    with pytest.raises(ValidationError, match="unknown model"):
        load_settings(config, home=tmp_path)
    config.write_text(yaml.safe_dump({"gateway": {"prot": 1}}))
    with pytest.raises(ValidationError):
        load_settings(config, home=tmp_path)


def test_secrets_are_masked_but_survive_runtime_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDRT_SECRET_KEY", "s3cret-value")
    monkeypatch.setenv("BUDRT_ADMIN_KEY", "admin-value")
    s = load_settings(home=tmp_path, gateway={"port": 9400})
    shown = str(s.masked())
    assert "s3cret-value" not in shown and "admin-value" not in shown
    runtime = tmp_path / "runtime.json"
    runtime.write_bytes(runtime_dump(s))
    monkeypatch.setenv("BUDRT_GATEWAY__PORT", "1")  # a child must not re-read the environment
    child = load_runtime(runtime)
    assert child.secret_key is not None and child.secret_key.get_secret_value() == "s3cret-value"
    assert child.admin_key is None
    assert child.gateway.port == 9400


def test_cli_config_show_masks_secrets(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDRT_")}
    env.update({"BUDRT_SECRET_KEY": "very-secret-hmac-key", "BUDRT_GATEWAY__PORT": "9123"})
    budrt = str(Path(sys.executable).parent / "budrt")
    out = subprocess.run(
        [budrt, "config", "show", "--home", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    shown = yaml.safe_load(out)
    assert shown["gateway"]["port"] == 9123
    assert shown["secret_key"] == "**********"
    assert "very-secret-hmac-key" not in out
