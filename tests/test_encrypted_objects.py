"""The encrypting object store (store/encrypted_objects.py) over a local store in a temporary
directory: round trips, nothing in clear on disk, streaming, swapped or changed files refused,
plaintext objects refused unless allowed, rewrap touching only the metadata, and `budrt kms`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from budrt.config import Settings
from budrt.security.envelope import ciphertext_size
from budrt.security.kms import IntegrityError, KmsError, LocalKeyring
from budrt.store.encrypted_objects import EncryptedObjectStore
from budrt.store.object_stores import make_object_store
from budrt.store.objects import LocalObjectStore, ObjectStore

PLAIN = b"\x89PNG secret pixels " * 50


@pytest.fixture
def inner(tmp_path: Path) -> ObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture
def keyring(tmp_path: Path) -> LocalKeyring:
    return LocalKeyring(tmp_path / "keyring.json")


@pytest.fixture
def store(inner: ObjectStore, keyring: LocalKeyring) -> EncryptedObjectStore:
    return EncryptedObjectStore(inner, keyring)


def _swap(a: Path, b: Path) -> None:
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.meta")  # LocalObjectStore's layout


def test_round_trip(store: EncryptedObjectStore, inner: ObjectStore, tmp_path: Path) -> None:
    store.put("images/a.png", PLAIN, "image/png", {"owner": "alice"})
    got = store.get("images/a.png")
    assert got is not None
    assert (got.data, got.content_type, got.size) == (PLAIN, "image/png", len(PLAIN))
    assert dict(got.metadata) == {"owner": "alice"}
    on_disk = (tmp_path / "objects" / "images" / "a.png").read_bytes()
    assert b"secret" not in on_disk and len(on_disk) == ciphertext_size(len(PLAIN))
    raw = inner.head("images/a.png")
    assert raw is not None and raw.metadata["budrt-size"] == str(len(PLAIN))
    assert raw.metadata["budrt-wrap-version"] == "v1" and raw.metadata["owner"] == "alice"
    head = store.head("images/a.png")
    assert head is not None and (head.size, head.content_type) == (len(PLAIN), "image/png")
    assert dict(head.metadata) == {"owner": "alice"}
    assert [(i.key, i.size) for i in store.list("images/")] == [("images/a.png", len(on_disk))]  # as stored
    assert store.presign("images/a.png", 60) is None
    store.put("images/empty", b"", "text/plain")
    empty, empty_head = store.get("images/empty"), store.head("images/empty")
    assert empty is not None and empty.data == b"" and empty_head is not None and empty_head.size == 0
    assert store.delete("images/a.png") is True and store.get("images/a.png") is None
    assert store.head("images/a.png") is None and store.open("images/a.png") is None


def test_metadata_rules(store: EncryptedObjectStore) -> None:
    with pytest.raises(ValueError, match="reserved"):
        store.put("a", b"x", "text/plain", {"budrt-size": "1"})
    with pytest.raises(ValueError):
        store.put("a", b"x", "text/plain", {"Bad Name": "1"})
    store.put("a", b"x", "text/plain", {"one": "1"})
    assert store.set_metadata("a", {"two": "2"}) is True
    got = store.get("a")
    assert got is not None and got.data == b"x" and dict(got.metadata) == {"two": "2"}
    with pytest.raises(ValueError, match="reserved"):
        store.set_metadata("a", {"budrt-wrap-version": "v9"})
    assert store.set_metadata("missing", {"x": "y"}) is False


def test_put_file_and_open_stream(inner: ObjectStore, keyring: LocalKeyring, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    store = EncryptedObjectStore(inner, keyring, temp_dir=staging)
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024 + 17))
    store.put_file("models/m/model.bin", source, "application/octet-stream", {"digest": "abc"})
    assert os.listdir(staging) == []  # the staged ciphertext is gone
    stored = (tmp_path / "objects" / "models" / "m" / "model.bin").read_bytes()
    assert stored[:4096] not in source.read_bytes() and len(stored) == ciphertext_size(source.stat().st_size)
    head = store.head("models/m/model.bin")
    assert head is not None and head.size == source.stat().st_size
    digest = hashlib.sha256()
    with store.open("models/m/model.bin") as stream:  # type: ignore[union-attr]
        while chunk := stream.read(1_000_003):
            digest.update(chunk)
    assert digest.digest() == hashlib.sha256(source.read_bytes()).digest()


def test_swapped_files_fail(store: EncryptedObjectStore, tmp_path: Path) -> None:
    store.put("images/a.png", b"A" * 1000, "image/png")
    store.put("images/b.png", b"B" * 1000, "image/png")
    a, b = tmp_path / "objects" / "images" / "a.png", tmp_path / "objects" / "images" / "b.png"
    _swap(a, b)  # the bytes alone: each now meets the other's data key
    for key in ("images/a.png", "images/b.png"):
        with pytest.raises(IntegrityError):
            store.get(key)
        with pytest.raises(IntegrityError):
            store.open(key)
    _swap(_sidecar(a), _sidecar(b))  # and the sidecars: each wrapped key meets another context
    for key in ("images/a.png", "images/b.png"):
        with pytest.raises(IntegrityError, match="failed authentication"):
            store.get(key)


def test_a_changed_byte_fails(store: EncryptedObjectStore, tmp_path: Path) -> None:
    store.put("images/a.png", os.urandom(200_000), "image/png")
    path = tmp_path / "objects" / "images" / "a.png"
    data = bytearray(path.read_bytes())
    data[150_000] ^= 0x04  # inside the third segment
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="segment 3 of images/a.png failed authentication"):
        store.get("images/a.png")
    with store.open("images/a.png") as stream, pytest.raises(IntegrityError):  # type: ignore[union-attr]
        stream.read()


def test_a_changed_size_or_missing_key_fails(store: EncryptedObjectStore, inner: ObjectStore) -> None:
    store.put("a", b"abc", "text/plain")
    raw = inner.head("a")
    assert raw is not None
    inner.set_metadata("a", {**raw.metadata, "budrt-size": "4"})
    with pytest.raises(IntegrityError, match="metadata says 4"):
        store.get("a")
    inner.set_metadata("a", {k: v for k, v in raw.metadata.items() if k != "budrt-wrap-blob"})
    with pytest.raises(IntegrityError, match="lacks budrt-wrap-blob"):
        store.get("a")


def test_plaintext_objects(inner: ObjectStore, keyring: LocalKeyring) -> None:
    inner.put("old.txt", b"from before", "text/plain", {"a": "b"})
    strict = EncryptedObjectStore(inner, keyring)
    for read in (strict.get, strict.open, strict.head):
        with pytest.raises(IntegrityError, match="not encrypted"):
            read("old.txt")
    lenient = EncryptedObjectStore(inner, keyring, allow_plaintext=True)
    got = lenient.get("old.txt")
    assert got is not None and got.data == b"from before"
    with lenient.open("old.txt") as stream:  # type: ignore[union-attr]
        assert stream.read() == b"from before"
    assert lenient.rewrap() == 0  # plaintext is left alone


def test_rewrap_touches_only_the_metadata(
    store: EncryptedObjectStore, keyring: LocalKeyring, inner: ObjectStore, tmp_path: Path
) -> None:
    for key in ("images/a.png", "images/b.png", "models/x.bin"):
        store.put(key, key.encode() * 100, "application/octet-stream", {"owner": "alice"})
    assert store.rewrap() == 0  # all current
    paths = {key: tmp_path / "objects" / key for key in ("images/a.png", "images/b.png", "models/x.bin")}
    before = {key: (path.read_bytes(), path.stat().st_mtime_ns) for key, path in paths.items()}
    sidecars = {key: _sidecar(path).read_bytes() for key, path in paths.items()}
    assert keyring.rotate() == "v2"
    assert store.rewrap("images/") == 2
    assert store.rewrap() == 1 and store.rewrap() == 0
    for key, path in paths.items():
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before[key]  # bulk bytes untouched
        assert _sidecar(path).read_bytes() != sidecars[key]
        raw = inner.head(key)
        assert raw is not None and raw.metadata["owner"] == "alice"
        assert raw.metadata["budrt-wrap-version"] == "v2"
    keyring.retire("v1")  # nothing needs v1 any more
    for key in paths:
        got = store.get(key)
        assert got is not None and got.data == key.encode() * 100 and dict(got.metadata) == {"owner": "alice"}


def test_a_retired_version_is_refused(store: EncryptedObjectStore, keyring: LocalKeyring) -> None:
    store.put("a", b"x", "text/plain")
    keyring.rotate()
    keyring.retire("v1")  # before rewrap: the object is lost to its owner, and says why
    with pytest.raises(KmsError, match="v1 is retired"):
        store.get("a")


def test_cli_status_rotate_rewrap_retire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from budrt.cli.app import app

    monkeypatch.setenv("BUDRT_HOME", str(tmp_path))
    runner = CliRunner()

    def cli(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, ["kms", *args])
        assert result.exit_code == code, result.output
        return result.output

    status = json.loads(cli("status", "--json"))
    assert (status["provider"], status["current"]) == ("local", "v1")
    assert (tmp_path / "keyring.json").stat().st_mode & 0o777 == 0o600
    store = make_object_store(Settings(home=tmp_path))
    store.put("images/a.png", b"pixels", "image/png")
    store.put("images/b.png", b"more", "image/png")
    assert "current version: v2" in cli("rotate")
    assert "current: v2" in cli("status") and "v1  active" in cli("status")
    assert "objects: rewrapped 2 object(s)" in cli("rewrap")
    assert "objects: rewrapped 0 object(s)" in cli("rewrap", "--prefix", "images/")
    assert "v2 is the current key version" in cli("retire", "v2", code=1)
    assert "retired v1" in cli("retire", "v1")
    assert "v1  retired" in cli("status")
    got = make_object_store(Settings(home=tmp_path)).get("images/a.png")
    assert got is not None and got.data == b"pixels"
