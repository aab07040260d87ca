"""The object stores (store/objects.py, store/s3_objects.py): put/get/delete/list, metadata, key
checks on both backends (`store` runs each test on the local one and on SeaweedFS' S3); atomic
writes, sidecars and private permissions of the local one."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from budrt.config import ObjectStoreConfig, Settings
from budrt.store.encrypted_objects import EncryptedObjectStore
from budrt.store.object_stores import make_object_store
from budrt.store.objects import (
    DEFAULT_TYPE,
    LocalObjectStore,
    ObjectStore,
    check_key,
)
from budrt.store.s3_objects import S3ObjectStore
from tests.procs import S3Server

BUCKET = "budrt-objects"  # one bucket for the session, a fresh prefix per test


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """An empty store: files under `tmp_path/objects`, or a fresh prefix in the S3 server's bucket."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    server = request.getfixturevalue("s3_server")
    return S3ObjectStore(server.config(BUCKET, prefix=f"test-{uuid.uuid4().hex[:12]}"))


def test_put_get_delete(store: ObjectStore) -> None:
    before = time.time()
    store.put("images/abc.png", b"\x89PNG data", "image/png")
    got = store.get("images/abc.png")
    assert got is not None
    assert (got.data, got.content_type, got.size) == (b"\x89PNG data", "image/png", 9)
    assert before - 1 <= got.modified <= time.time() + 1
    store.put("images/abc.png", b"new", "image/webp")  # replaced, type included
    got = store.get("images/abc.png")
    assert got is not None and (got.data, got.content_type, got.size) == (b"new", "image/webp", 3)
    assert store.delete("images/abc.png") is True
    assert store.get("images/abc.png") is None
    assert store.delete("images/abc.png") is False
    assert store.get("never/put.png") is None
    assert store.list("") == []


def test_delete_takes_the_sidecar_too(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put("images/abc.png", b"x", "image/png", {"a": "b"})
    assert store.delete("images/abc.png") is True
    assert sorted(os.listdir(tmp_path / "objects" / "images")) == []


def test_a_missing_type_reads_as_octet_stream(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("a/b.bin", b"x", "application/x-thing")
    (tmp_path / "a" / ".b.bin.meta").unlink()
    got = store.get("a/b.bin")
    assert got is not None and got.content_type == DEFAULT_TYPE


def test_list_by_prefix(store: ObjectStore) -> None:
    assert store.list("images/") == []  # nothing stored yet, not even the root
    for key in ("images/b.png", "images/ab.png", "images/a/deep.png", "other/x.png", "top.png"):
        store.put(key, key.encode(), "image/png")
    assert [i.key for i in store.list("images/")] == ["images/a/deep.png", "images/ab.png", "images/b.png"]
    # A string prefix, as in S3: "images/a" holds the directory "images/a/" and "images/ab.png".
    assert [i.key for i in store.list("images/a")] == ["images/a/deep.png", "images/ab.png"]
    assert [i.key for i in store.list("")] == [
        "images/a/deep.png",
        "images/ab.png",
        "images/b.png",
        "other/x.png",
        "top.png",
    ]
    assert store.list("nothing/") == []
    info = store.list("top")[0]
    assert (info.key, info.size) == ("top.png", len(b"top.png")) and info.modified > 0


def test_list_hides_sidecars_and_temporary_files(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put("images/b.png", b"b", "image/png", {"k": "v"})
    (tmp_path / "objects" / "images" / ".stray.png.1234.tmp").write_bytes(b"half")  # a crashed put
    assert [i.key for i in store.list("images/")] == ["images/b.png"]


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs.png",
        "a/../b.png",
        "..",
        "../x",
        "a//b",
        "a/",
        ".hidden",
        "a/.b.png",
        "a/./b",
        "a b",
        "a\\b",
        "é.png",
        "a\x00b",
        "x" * 1025,
    ],
)
def test_bad_keys_are_refused(store: ObjectStore, tmp_path: Path, key: str) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"x")
    calls = [
        lambda: store.put(key, b"x", "image/png"),
        lambda: store.put_file(key, source, "image/png"),
        lambda: store.get(key),
        lambda: store.open(key),
        lambda: store.head(key),
        lambda: store.set_metadata(key, {}),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    assert not (tmp_path / "objects").exists() or list((tmp_path / "objects").rglob("*")) == []
    assert store.list("") == []


def test_good_keys(store: ObjectStore) -> None:
    for key in ("a", "images/Abc_-9.png", "a/b/c/d.e.f", "x" * 1024):
        assert check_key(key) == key
    long = "/".join(["x" * 200] * 5)  # 1004 characters: room for the S3 store's test prefix
    store.put(long, b"long", "text/plain")
    assert [i.key for i in store.list("")] == [long]
    with pytest.raises(ValueError):
        store.list("../")


def test_metadata_head_and_set_metadata(store: ObjectStore) -> None:
    store.put("m/a.png", b"pixels", "image/png", {"owner": "team-1", "seed": "42"})
    head = store.head("m/a.png")
    assert head is not None
    assert (head.key, head.size, head.content_type) == ("m/a.png", 6, "image/png")
    assert dict(head.metadata) == {"owner": "team-1", "seed": "42"} and head.modified > 0
    got = store.get("m/a.png")
    assert got is not None and dict(got.metadata) == {"owner": "team-1", "seed": "42"}
    assert store.set_metadata("m/a.png", {"owner": "team-2"}) is True  # replaced, not merged
    head = store.head("m/a.png")
    assert head is not None and dict(head.metadata) == {"owner": "team-2"}
    assert head.content_type == "image/png" and head.size == 6
    got = store.get("m/a.png")
    assert got is not None and got.data == b"pixels" and got.content_type == "image/png"
    assert store.set_metadata("m/missing.png", {"a": "b"}) is False
    assert store.head("m/missing.png") is None and store.head("m") is None
    for bad in ({"Upper": "x"}, {"a": "caf\u00e9"}, {"a": "x" * 2100}, {"a_b": "x"}):
        with pytest.raises(ValueError):
            store.put("m/b.png", b"x", "image/png", bad)
        with pytest.raises(ValueError):
            store.set_metadata("m/a.png", bad)
    assert store.head("m/b.png") is None


def test_put_file_and_open(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    data = os.urandom(3 << 20)
    source.write_bytes(data)
    store.put_file("models/m.bin", source, "application/x-model", {"sha256": "abc"})
    head = store.head("models/m.bin")
    assert head is not None and head.size == len(data) and head.content_type == "application/x-model"
    assert dict(head.metadata) == {"sha256": "abc"}
    stream = store.open("models/m.bin")
    assert stream is not None
    with stream:
        chunks = []
        while chunk := stream.read(1 << 20):
            chunks.append(chunk)
    assert b"".join(chunks) == data
    assert store.open("models/missing.bin") is None


def test_presign(store: ObjectStore) -> None:
    store.put("p/a.txt", b"hello", "text/plain")
    url = store.presign("p/a.txt", 60)
    if isinstance(store, LocalObjectStore):
        assert url is None  # served by the gateway's signed links instead
    else:
        assert url is not None and url.startswith("http")


def test_private_permissions(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not widen them
    try:
        store = LocalObjectStore(tmp_path / "objects")
        store.put("images/a/b/c.png", b"x", "image/png")
    finally:
        os.umask(old)
    root = tmp_path / "objects"
    for directory in (root, root / "images", root / "images/a", root / "images/a/b"):
        assert _mode(directory) == 0o700, directory
    for path in (root / "images/a/b/c.png", root / "images/a/b/.c.png.meta"):
        assert _mode(path) == 0o600, path


def test_a_failed_write_keeps_the_old_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("k.png", b"old", "image/png")

    def full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        store.put("k.png", b"new", "image/png")
    monkeypatch.undo()
    got = store.get("k.png")
    assert got is not None and got.data == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k.png.meta", "k.png"]  # no temp file left


def test_readers_see_whole_objects(store: ObjectStore) -> None:
    """A put replaces the object at once: a reader racing the writer gets one version whole."""
    versions = [bytes([v]) * (1 << 20) for v in (1, 2)]
    store.put("race.bin", versions[0], "application/octet-stream")
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.put("race.bin", versions[i % 2], "application/octet-stream")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(100):
            got = store.get("race.bin")
            assert got is not None and got.data in versions
    finally:
        stop.set()
        writer.join()


def test_make_object_store(tmp_path: Path, s3_server: S3Server) -> None:
    default = make_object_store(Settings(home=tmp_path, secret_key="test-secret-test-secret"))
    assert isinstance(default, EncryptedObjectStore)  # encrypted by default
    assert isinstance(default.inner, LocalObjectStore) and default.inner.root == tmp_path / "objects"
    chosen = Settings(home=tmp_path, objects={"path": str(tmp_path / "elsewhere"), "encrypt": False})
    store = make_object_store(chosen)
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "elsewhere"
    objects = ObjectStoreConfig(backend="s3", s3=s3_server.config("budrt-factory"))
    on_s3 = make_object_store(Settings(home=tmp_path, objects=objects))
    assert isinstance(on_s3, EncryptedObjectStore) and isinstance(on_s3.inner, S3ObjectStore)
    on_s3.put("images/x.png", b"secret pixels", "image/png")
    raw = on_s3.inner.get("images/x.png")
    assert raw is not None and b"secret pixels" not in raw.data  # the bucket holds ciphertext
    assert on_s3.get("images/x.png").data == b"secret pixels"  # type: ignore[union-attr]
