"""The local object store (store/objects.py): put/get/delete/list, atomic writes, key checks and
private permissions."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from budrt.config import Settings
from budrt.store.objects import DEFAULT_TYPE, LocalObjectStore, check_key, make_object_store


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_put_get_delete(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
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
    assert sorted(os.listdir(tmp_path / "objects" / "images")) == []  # the type sidecar went too


def test_a_missing_type_reads_as_octet_stream(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("a/b.bin", b"x", "application/x-thing")
    (tmp_path / "a" / ".b.bin.type").unlink()
    got = store.get("a/b.bin")
    assert got is not None and got.content_type == DEFAULT_TYPE


def test_list_by_prefix(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
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
    (tmp_path / "objects" / "images" / ".stray.png.1234.tmp").write_bytes(b"half")  # a crashed put
    assert [i.key for i in store.list("images/b")] == ["images/b.png"]  # sidecars and temp files hidden


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
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    with pytest.raises(ValueError):
        store.put(key, b"x", "image/png")
    with pytest.raises(ValueError):
        store.get(key)
    with pytest.raises(ValueError):
        store.delete(key)
    assert not (tmp_path / "objects").exists() or list((tmp_path / "objects").rglob("*")) == []


def test_good_keys(tmp_path: Path) -> None:
    for key in ("a", "images/Abc_-9.png", "a/b/c/d.e.f", "x" * 1024):
        assert check_key(key) == key
    with pytest.raises(ValueError):
        LocalObjectStore(tmp_path).list("../")


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
    for path in (root / "images/a/b/c.png", root / "images/a/b/.c.png.type"):
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
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k.png.type", "k.png"]  # no temp file left


def test_readers_see_whole_objects(tmp_path: Path) -> None:
    """A put replaces the file at once: a reader racing the writer gets one version whole."""
    store = LocalObjectStore(tmp_path)
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


def test_make_object_store(tmp_path: Path) -> None:
    default = make_object_store(Settings(home=tmp_path, secret_key="test-secret-test-secret"))
    assert isinstance(default, LocalObjectStore) and default.root == tmp_path / "objects"
    chosen = Settings(home=tmp_path, objects={"path": str(tmp_path / "elsewhere")})
    store = make_object_store(chosen)
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "elsewhere"
