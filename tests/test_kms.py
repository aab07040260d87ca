"""Key providers (security/kms.py): the local keyring file (permissions, rotation, rewrap,
retirement, tampering, two processes rotating at once) and AWS KMS against a real moto server."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from budrt.config import Settings
from budrt.security.kms import (
    AwsKms,
    IntegrityError,
    KmsError,
    LocalKeyring,
    WrappedKey,
    make_key_provider,
)
from tests.kms_server import CREDENTIALS, REGION, MotoServer

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = {"budrt-object": "images/a.png"}


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _flip(wrapped: WrappedKey, index: int = -1) -> WrappedKey:
    blob = bytearray(wrapped.blob)
    blob[index] ^= 1
    return replace(wrapped, blob=bytes(blob))


def test_keyring_is_created_private_at_first_use(tmp_path: Path) -> None:
    path = tmp_path / "home" / "keyring.json"
    ring = LocalKeyring(path)
    assert not path.exists()
    assert ring.current_version() == "v1"
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    data_key, wrapped = ring.generate_data_key(CONTEXT)
    assert len(data_key) == 32 and (wrapped.provider, wrapped.version) == ("local", "v1")
    assert data_key not in path.read_bytes() and data_key not in wrapped.blob
    assert LocalKeyring(path).unwrap(wrapped, CONTEXT) == data_key  # another instance, same file


def test_wrapped_key_metadata_round_trip() -> None:
    wrapped = WrappedKey("local", "local-abc", "v3", bytes(range(60)))
    metadata = wrapped.to_metadata("budrt-wrap-")
    names = {"budrt-wrap-provider", "budrt-wrap-key-id", "budrt-wrap-version", "budrt-wrap-blob"}
    assert set(metadata) == names
    assert all(value.isascii() and value.isprintable() for value in metadata.values())
    assert WrappedKey.from_metadata(metadata, "budrt-wrap-") == wrapped
    with pytest.raises(IntegrityError, match="lacks budrt-wrap-blob"):
        WrappedKey.from_metadata({k: v for k, v in metadata.items() if k != "budrt-wrap-blob"}, "budrt-wrap-")
    with pytest.raises(IntegrityError, match="not base64"):
        WrappedKey.from_metadata({**metadata, "budrt-wrap-blob": "***"}, "budrt-wrap-")


def test_rotate_rewrap_retire(tmp_path: Path) -> None:
    ring = LocalKeyring(tmp_path / "keyring.json")
    data_key, old = ring.generate_data_key(CONTEXT)
    assert ring.rewrap(old, CONTEXT) is old  # already current: untouched
    assert ring.rotate() == "v2" and ring.current_version() == "v2"
    assert ring.unwrap(old, CONTEXT) == data_key  # v1 data still readable
    assert ring.generate_data_key(CONTEXT)[1].version == "v2"
    new = ring.rewrap(old, CONTEXT)
    assert new.version == "v2" and new.blob != old.blob and ring.unwrap(new, CONTEXT) == data_key
    with pytest.raises(KmsError, match="v2 is the current key version"):
        ring.retire("v2")
    with pytest.raises(KmsError, match="not in keyring"):
        ring.retire("v9")
    ring.retire("v1")
    with pytest.raises(KmsError, match="v1 is retired"):
        ring.unwrap(old, CONTEXT)
    with pytest.raises(KmsError, match="v1 is retired"):
        ring.rewrap(old, CONTEXT)
    assert ring.unwrap(new, CONTEXT) == data_key
    states = {v["version"]: v["state"] for v in ring.describe()["versions"]}
    assert states == {"v1": "retired", "v2": "current"}


def test_a_rotation_elsewhere_is_seen(tmp_path: Path) -> None:
    """A server's keyring object picks up `budrt kms rotate` done by another process."""
    server, cli = LocalKeyring(tmp_path / "keyring.json"), LocalKeyring(tmp_path / "keyring.json")
    assert server.current_version() == "v1"
    cli.rotate()
    assert server.generate_data_key(CONTEXT)[1].version == "v2"


def test_tampering_and_other_contexts_fail(tmp_path: Path) -> None:
    ring = LocalKeyring(tmp_path / "keyring.json")
    _, wrapped = ring.generate_data_key(CONTEXT)
    for index in (0, 11, 12, 30, -1):  # nonce, sealed key, tag
        with pytest.raises(IntegrityError, match="failed authentication"):
            ring.unwrap(_flip(wrapped, index), CONTEXT)
    with pytest.raises(IntegrityError):
        ring.unwrap(wrapped, {"budrt-object": "images/b.png"})
    with pytest.raises(IntegrityError):
        ring.unwrap(wrapped, {**CONTEXT, "extra": ""})
    with pytest.raises(IntegrityError):
        ring.unwrap(replace(wrapped, blob=wrapped.blob[:20]), CONTEXT)
    ring.rotate()
    with pytest.raises(IntegrityError):  # the version is bound too: v1's blob claimed as v2
        ring.unwrap(replace(wrapped, version="v2"), CONTEXT)
    with pytest.raises(KmsError, match="is not in keyring"):
        ring.unwrap(replace(wrapped, version="v7"), CONTEXT)
    with pytest.raises(KmsError, match="wrapped by keyring"):
        LocalKeyring(tmp_path / "other.json").unwrap(wrapped, CONTEXT)
    with pytest.raises(KmsError, match="provider 'aws-kms'"):
        ring.unwrap(replace(wrapped, provider="aws-kms"), CONTEXT)


def test_an_unreadable_keyring_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text("{not json")
    with pytest.raises(KmsError, match="is unreadable"):
        LocalKeyring(path).current_version()


ROTATE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from budrt.security.kms import LocalKeyring
    ring, ready, go = LocalKeyring(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
    ready.touch()
    while not go.exists():
        time.sleep(0.001)
    print(json.dumps([ring.rotate() for _ in range(int(sys.argv[4]))]))
    """
)


def test_two_processes_rotating_at_once_get_distinct_versions(tmp_path: Path) -> None:
    path, go, rounds = tmp_path / "keyring.json", tmp_path / "go", 40
    LocalKeyring(path).current_version()  # v1
    ready = [tmp_path / f"ready-{n}" for n in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ROTATE, str(path), str(flag), str(go), str(rounds)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 60
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.005)
    go.touch()  # both imported and waiting: they rotate at the same time
    results = [json.loads(proc.communicate(timeout=60)[0]) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    versions = results[0] + results[1]
    expected = {f"v{n}" for n in range(2, 2 * rounds + 2)}
    assert len(versions) == len(set(versions)) == 2 * rounds and set(versions) == expected
    ring = json.loads(path.read_text())
    assert set(ring["versions"]) == expected | {"v1"} and ring["current"] == f"v{2 * rounds + 1}"


def test_make_key_provider(tmp_path: Path) -> None:
    local = make_key_provider(Settings(home=tmp_path))
    assert isinstance(local, LocalKeyring) and local.path == tmp_path / "keyring.json"
    elsewhere = make_key_provider(Settings(home=tmp_path, kms={"keyring": str(tmp_path / "k.json")}))
    assert isinstance(elsewhere, LocalKeyring) and elsewhere.path == tmp_path / "k.json"
    with pytest.raises(KmsError, match="key_id is required"):
        make_key_provider(Settings(home=tmp_path, kms={"provider": "aws-kms"}))
    with pytest.raises(KmsError, match="together"):
        half = {"provider": "aws-kms", "key_id": "k", "access_key_id": "a"}
        make_key_provider(Settings(home=tmp_path, kms=half))


# AWS KMS, against moto's server ------------------------------------------------------------


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture
def aws(moto: MotoServer) -> AwsKms:
    key = moto.client().create_key(Description="budrt test")["KeyMetadata"]
    return AwsKms(key["KeyId"], REGION, moto.url, CREDENTIALS)


def test_aws_generate_and_unwrap(aws: AwsKms) -> None:
    data_key, wrapped = aws.generate_data_key(CONTEXT)
    assert len(data_key) == 32 and wrapped.provider == "aws-kms"
    assert wrapped.key_id.startswith("arn:aws:kms:") and wrapped.key_id.endswith(aws.key_id)
    assert wrapped.version == aws.current_version()  # moto reports no KeyMaterialId: the ARN
    assert aws.unwrap(wrapped, CONTEXT) == data_key
    restored = WrappedKey.from_metadata(wrapped.to_metadata("budrt-wrap-"), "budrt-wrap-")
    assert aws.unwrap(restored, CONTEXT) == data_key


def test_aws_wrong_context_or_tampered_blob_fails(aws: AwsKms) -> None:
    _, wrapped = aws.generate_data_key(CONTEXT)
    with pytest.raises(IntegrityError, match="InvalidCiphertextException"):
        aws.unwrap(wrapped, {"budrt-object": "images/b.png"})
    with pytest.raises(IntegrityError):
        aws.unwrap(_flip(wrapped), CONTEXT)
    with pytest.raises(KmsError, match="provider 'aws-kms'"):
        LocalKeyring(Path("/nonexistent/keyring.json")).unwrap(wrapped, CONTEXT)


def test_aws_refuses_another_keys_blob(aws: AwsKms, moto: MotoServer) -> None:
    other = moto.client().create_key()["KeyMetadata"]["KeyId"]
    _, wrapped = AwsKms(other, REGION, moto.url, CREDENTIALS).generate_data_key(CONTEXT)
    with pytest.raises((KmsError, IntegrityError)):
        aws.unwrap(wrapped, CONTEXT)


def test_aws_alias_and_errors(aws: AwsKms, moto: MotoServer) -> None:
    moto.client().create_alias(AliasName="alias/budrt-test", TargetKeyId=aws.key_id)
    by_alias = AwsKms("alias/budrt-test", REGION, moto.url, CREDENTIALS)
    data_key, wrapped = by_alias.generate_data_key(CONTEXT)
    assert aws.unwrap(wrapped, CONTEXT) == data_key
    assert by_alias.rotate() == wrapped.version  # RotateKeyOnDemand takes the ARN, not the alias
    with pytest.raises(KmsError, match="generate_data_key failed"):
        AwsKms("alias/missing", REGION, moto.url, CREDENTIALS).generate_data_key(CONTEXT)


def test_aws_rotate_and_rewrap_as_far_as_moto_goes(aws: AwsKms) -> None:
    """moto records on-demand rotations but keeps the key material and reports no material id:
    the version stays the key's ARN, so rewrap is a no-op there. ReEncrypt itself works."""
    data_key, wrapped = aws.generate_data_key(CONTEXT)
    before = aws.current_version()
    assert aws.rotate() == before
    described = aws.describe()
    assert described["current"] == before and described["key_id"] == wrapped.key_id
    assert [v["type"] for v in described["versions"]] == ["on_demand"]
    assert aws.rewrap(wrapped, CONTEXT) is wrapped  # current already
    stale = replace(wrapped, version="older-material")  # as if KMS had rotated the material
    moved = aws.rewrap(stale, CONTEXT)
    assert moved.version == before and moved.blob != wrapped.blob
    assert aws.unwrap(moved, CONTEXT) == data_key
    with pytest.raises(IntegrityError):
        aws.rewrap(replace(stale, blob=_flip(wrapped).blob), CONTEXT)


def test_make_key_provider_aws(moto: MotoServer, tmp_path: Path) -> None:
    key = moto.client().create_key()["KeyMetadata"]["Arn"]
    kms = {
        "provider": "aws-kms",
        "key_id": key,
        "region": REGION,
        "endpoint_url": moto.url,
        "access_key_id": CREDENTIALS[0],
        "secret_access_key": CREDENTIALS[1],
    }
    provider = make_key_provider(Settings(home=tmp_path, kms=kms))
    assert isinstance(provider, AwsKms)
    data_key, wrapped = provider.generate_data_key(CONTEXT)
    assert provider.unwrap(wrapped, CONTEXT) == data_key


def test_aws_unreachable_is_a_kms_error() -> None:
    from tests.mock_upstream import free_port

    down = AwsKms("some-key", REGION, f"http://127.0.0.1:{free_port()}", CREDENTIALS)
    with pytest.raises(KmsError, match="describe_key failed"):
        down.current_version()
