"""A model server's local disk cache of repository artifacts.

Content-addressed (`<root>/<manifest digest>/`), so an entry never changes once written. Every
`get` re-hashes the entry against its manifest before handing it to a loader: a corrupted file is
refused and fetched again, never loaded. Fetches write into a temporary directory that is renamed
into place atomically, and a per-digest lock (a thread lock plus an `flock` shared with other
processes on the host) makes concurrent loaders wait for one fetch. Above the size cap, least
recently used entries go. A manifest whose paths could leave the entry is refused before any byte
is written (`repository.check_path`), and a cached file reached through a symlink is refetched.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from budrt.store.repository import (
    CACHE_MANIFEST,
    CHUNK,
    ArtifactCorrupt,
    InvalidManifest,
    Manifest,
    ModelRepository,
)

log = logging.getLogger(__name__)
MANIFEST = CACHE_MANIFEST


Fetched = Callable[[int, int], None]  # (bytes copied, bytes in all) while an artifact is fetched


def _ignore(done: int, total: int) -> None:
    return None


class ArtifactCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.fetches = 0  # artifacts fetched by this process
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        (root / ".locks").mkdir(parents=True, exist_ok=True)

    def get(self, digest: str, repository: ModelRepository, fetched: Fetched | None = None) -> Path:
        """The local, verified copy of artifact `digest` (the file itself for single-file models).
        `fetched(done, total)`: bytes copied so far when it has to come from the repository."""
        if not all(c in "0123456789abcdef" for c in digest) or len(digest) != 64:
            raise ValueError(f"invalid artifact digest {digest!r}")
        entry = self.root / digest
        with self._locked(digest):
            if entry.is_dir():
                try:
                    manifest = self._verify(entry, digest)
                    os.utime(entry / MANIFEST)  # last use, for LRU cleanup
                    return _model_path(entry, manifest)
                except ArtifactCorrupt as exc:
                    log.warning("artifact cache: %s; fetching it again", exc)
                    shutil.rmtree(entry)
            manifest = self._fetch(digest, repository, entry, fetched or _ignore)
        self.cleanup(keep=digest)
        return _model_path(entry, manifest)

    def _fetch(self, digest: str, repository: ModelRepository, entry: Path, fetched: Fetched) -> Manifest:
        manifest = repository.manifest(digest)
        tmp = self.root / f".tmp-{digest[:16]}-{uuid.uuid4().hex}"
        done = 0
        try:
            fetched(0, manifest.size)
            for item in manifest.files:
                target = tmp / item.path
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with repository.open_blob(item.sha256) as src, target.open("wb") as dst:
                    while chunk := src.read(CHUNK):
                        h.update(chunk)
                        dst.write(chunk)
                        done += len(chunk)
                        fetched(done, manifest.size)
                if h.hexdigest() != item.sha256:
                    raise ArtifactCorrupt(
                        f"artifact {digest[:12]}: {item.path} in the repository does not match its digest"
                    )
            (tmp / MANIFEST).write_bytes(manifest.to_bytes())
            os.rename(tmp, entry)  # atomic: an entry is complete or absent
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.fetches += 1
        log.info("artifact cache: fetched %s (%d MiB)", digest[:12], manifest.size >> 20)
        return manifest

    @staticmethod
    def _verify(entry: Path, digest: str) -> Manifest:
        raw = (entry / MANIFEST).read_bytes() if (entry / MANIFEST).exists() else b""
        if hashlib.sha256(raw).hexdigest() != digest:
            raise ArtifactCorrupt(f"artifact {digest[:12]}: cached manifest does not match its digest")
        manifest = Manifest.from_bytes(raw)
        real = entry.resolve()
        for item in manifest.files:
            path = entry / item.path
            # We only ever write regular files here: a symlink on the way was put there by someone
            # else and could point anywhere (its target's bytes may even match the digest).
            if path.resolve() != real / item.path:
                raise ArtifactCorrupt(f"artifact {digest[:12]}: cached {item.path} is reached by a symlink")
            h = hashlib.sha256()
            try:
                with path.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
            except FileNotFoundError:
                raise ArtifactCorrupt(f"artifact {digest[:12]}: cached {item.path} is missing") from None
            if h.hexdigest() != item.sha256:
                raise ArtifactCorrupt(f"artifact {digest[:12]}: cached {item.path} does not match its digest")
        return manifest

    def cleanup(self, keep: str | None = None) -> None:
        """Remove least recently used entries until the cache is under its cap (`keep` stays)."""
        entries = []
        for entry in self.root.iterdir():
            marker = entry / MANIFEST
            if entry.name.startswith(".") or not marker.exists():
                continue
            try:
                size = sum(f.size for f in Manifest.from_bytes(marker.read_bytes()).files)
            except InvalidManifest:  # written before manifests were checked; never served now
                continue
            entries.append((marker.stat().st_mtime, entry, size))
        total = sum(size for _, _, size in entries)
        for _, entry, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry.name == keep:
                continue
            with self._locked(entry.name, wait=False) as held:
                if not held:  # someone is fetching or verifying it right now
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                total -= size
                log.info("artifact cache: removed %s (LRU, %d MiB)", entry.name[:12], size >> 20)

    @contextlib.contextmanager
    def _locked(self, digest: str, wait: bool = True) -> Iterator[bool]:
        with self._guard:
            lock = self._locks.setdefault(digest, threading.Lock())
        if not lock.acquire(blocking=wait):
            yield False
            return
        try:
            with (self.root / ".locks" / digest).open("a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                try:
                    yield True
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            lock.release()


def _model_path(entry: Path, manifest: Manifest) -> Path:
    return entry / manifest.files[0].path if manifest.kind == "file" else entry
