"""The settings tree: defaults, YAML, BUDRT_* environment, CLI overrides, masking."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_origin

import orjson
import pytest
import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from budrt.config import (
    REVEAL_ALL,
    ModelConfig,
    SecretText,
    Settings,
    load_runtime,
    load_settings,
    mask_url,
    runtime_dump,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("BUDRT_"):
            monkeypatch.delenv(name)


def test_defaults_name_the_packaged_models(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path)
    assert [m.name for m in s.models] == ["smollm2-135m-instruct", "all-minilm-l6-v2", "shapes-diffusion"]
    assert [(x.name, x.models) for x in s.model_servers] == [
        ("text", ["smollm2-135m-instruct"]),
        ("embed", ["all-minilm-l6-v2"]),
        ("image", ["shapes-diffusion"]),
    ]
    only_chat = load_settings(home=tmp_path, models=[s.models[0].model_dump()])
    assert [x.name for x in only_chat.model_servers] == ["text"]  # default servers host what is configured
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


# -- secrets: one typed mechanism (config.Secret) for every secret field, found from the tree --


def _has_secret(annotation: object) -> bool:
    return annotation is SecretStr or any(_has_secret(a) for a in get_args(annotation))


def _secret_paths(node: BaseModel, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every secret field of the tree under `node` (list items included), as paths."""
    out = []
    for name, field in type(node).model_fields.items():
        value = getattr(node, name)
        if get_origin(field.annotation) is list and _has_secret(field.annotation):
            out.append((*path, name, 0))  # a list of secrets: its first item
        elif _has_secret(field.annotation):
            out.append((*path, name))
        elif isinstance(value, BaseModel):
            out += _secret_paths(value, (*path, name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out += _secret_paths(item, (*path, name, i))
    return out


def _get(data: object, path: tuple[str | int, ...]) -> object:
    for part in path:
        data = data[part] if isinstance(part, int) or isinstance(data, dict) else getattr(data, part)
    return data


def _every_secret_set(home: Path) -> tuple[Settings, dict[tuple[str | int, ...], str]]:
    """Settings with every secret field set to its own value (URL-shaped: some fields are URLs)."""
    base = Settings(
        home=home,
        deployments=[{"model": "up", "endpoints": ["http://127.0.0.1:9/v1"]}],
        model_servers=[{"name": "text", "models": ["smollm2-135m-instruct"]}],
    )
    data = base.model_dump()
    values = {}
    for path in _secret_paths(base):
        word = "-".join(str(p) for p in path)
        values[path] = f"redis://user:pw-{word}-0123456789@db.example:6379/0"
        parent = _get(data, path[:-1]) if len(path) > 1 else data
        if isinstance(parent, list) and len(parent) == path[-1]:
            parent.append(values[path])
        else:
            parent[path[-1]] = values[path]
    return Settings.model_validate(data), values


def test_every_secret_field_survives_the_runtime_file(tmp_path: Path) -> None:
    settings, values = _every_secret_set(tmp_path)
    assert len(values) >= 8  # secret_key, admin_key, internal_key, database_url, redis_url, jwt, ...
    runtime = tmp_path / "runtime.json"
    runtime.write_bytes(runtime_dump(settings))
    child = load_runtime(runtime)
    for path, value in values.items():
        secret = _get(child, path)
        if path == ("admin_key",):  # only the first start needs it, and it has run by then
            assert secret is None
            continue
        assert isinstance(secret, SecretStr) and secret.get_secret_value() == value, path


def test_a_new_secret_field_needs_no_list_of_names() -> None:
    class WithToken(Settings):
        new_token: SecretText | None = None

    settings = WithToken(new_token="tok-0123456789", models=[], model_servers=[])
    assert orjson.loads(runtime_dump(settings))["new_token"] == "tok-0123456789"
    assert settings.masked()["new_token"] == "**********"
    assert orjson.loads(runtime_dump(settings, servers=True))["new_token"] is None  # not theirs


def test_model_servers_get_only_the_secrets_marked_for_them(tmp_path: Path) -> None:
    settings, values = _every_secret_set(tmp_path)
    runtime = tmp_path / "server.json"
    runtime.write_bytes(runtime_dump(settings, servers=True))
    child = load_runtime(runtime)
    kept = {path for path in values if _get(child, path) is not None}
    assert kept == {
        ("internal_key",),
        ("database_url",),
        ("database_replica_urls", 0),
        ("model_servers", 0, "register_key"),
    }
    for path in kept:
        assert _get(child, path).get_secret_value() == values[path]


def test_cli_config_show_masks_every_secret_and_url_password(tmp_path: Path) -> None:
    import subprocess
    import sys

    settings, values = _every_secret_set(tmp_path)
    data = settings.model_dump(mode="json", context=REVEAL_ALL)
    data.pop("config")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("BUDRT_")}
    budrt = str(Path(sys.executable).parent / "budrt")
    argv = [budrt, "config", "show", "--home", str(tmp_path), "--config", str(config)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    for value in values.values():
        assert value.split(":")[2].split("@")[0] not in out  # the password part
    shown = yaml.safe_load(out)
    assert shown["database_url"] == "redis://user:****@db.example:6379/0"
    assert shown["gateway"]["redis_url"] == "redis://user:****@db.example:6379/0"
    assert shown["secret_key"] == "**********"


def test_mask_url() -> None:
    assert mask_url("postgresql://user:pw@host:5432/db") == "postgresql://user:****@host:5432/db"
    assert mask_url("redis://:pw@host/0") == "redis://:****@host/0"
    assert mask_url("sqlite:////var/budrt.db") == "sqlite:////var/budrt.db"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_a_config_error_never_echoes_a_secret(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "bad.yaml"
    bad = {"deployments": [{"endpoints": ["http://x/v1"], "api_key": "sk-upstream-LEAKED-value"}]}
    config.write_text(yaml.safe_dump(bad))  # `model` is missing: the error names the place only
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("BUDRT_")}
    budrt = str(Path(sys.executable).parent / "budrt")
    argv = [budrt, "config", "show", "--home", str(tmp_path), "--config", str(config)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "deployments.0.model" in done.stderr
    assert "LEAKED" not in done.stderr + done.stdout


def test_a_yaml_syntax_error_names_the_line_not_its_text(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "broken.yaml"
    config.write_text('log_level: info\nsecret_key: "hmac-LEAKED-value\n')  # unterminated quote
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("BUDRT_")}
    budrt = str(Path(sys.executable).parent / "budrt")
    argv = [budrt, "config", "show", "--home", str(tmp_path), "--config", str(config)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid YAML" in done.stderr and "line 2" in done.stderr
    assert "LEAKED" not in done.stderr + done.stdout


@pytest.mark.parametrize("value", [-1, "sixteen", 2.5, "１６"])
def test_q4_decode_rows_refuses_hostile_values(value: object) -> None:
    """0 turns the 4-bit steps off and None leaves the crossover to the engine; nothing else."""
    fields = {"name": "m", "task": "chat", "format": "gguf", "source": "x.gguf"}
    with pytest.raises(ValidationError, match="q4_decode_rows"):
        ModelConfig(**fields, q4_decode_rows=value)
    assert ModelConfig(**fields).q4_decode_rows is None
    assert ModelConfig(**fields, q4_decode_rows=0).q4_decode_rows == 0


@pytest.mark.parametrize("value", ["definitely", 2, -1, "ｔｒｕｅ", [True]])
def test_int8_linears_refuses_hostile_values(value: object) -> None:
    """true, false, or None (the engine decides); nothing else."""
    fields = {"name": "m", "task": "chat", "format": "gguf", "source": "x.gguf"}
    with pytest.raises(ValidationError, match="int8_linears"):
        ModelConfig(**fields, int8_linears=value)
    assert ModelConfig(**fields).int8_linears is None
    assert ModelConfig(**fields, int8_linears=False).int8_linears is False
