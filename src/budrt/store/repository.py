"""The model repository: model files, content-addressed, in an object store.

Layout (any object store): `blobs/sha256/<hex>` holds one file's bytes; `manifests/sha256/<hex>`
a JSON list of (relative path, sha256, size) - one entry for a single-file model (GGUF), one
per file for a directory. A model's digest is its manifest's sha256, so one digest pins every byte.
`LocalObjectStore` keeps objects on the filesystem; an S3-compatible store implements the same
four methods.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

CHUNK = 1 << 20
CACHE_MANIFEST = ".manifest.json"  # where an artifact cache entry keeps its manifest (reserved)
KINDS = ("file", "dir")


class ObjectStore(ABC):
    @abstractmethod
    def put(self, key: str, source: Path) -> None:
        """Store the file at `source` under `key` (atomically: readers see all of it or nothing)."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A binary stream of the object; FileNotFoundError if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def keys(self, prefix: str) -> Iterator[str]: ...


class LocalObjectStore(ObjectStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.reads = 0  # objects opened; tests check that waiters share one fetch

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid object key {key!r}")
        return self.root / key

    def put(self, key: str, source: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)

    def open(self, key: str) -> BinaryIO:
        self.reads += 1
        return self._path(key).open("rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.is_file() and not path.name.endswith(".tmp"):
                    yield path.relative_to(self.root).as_posix()


def open_store(url: str) -> ObjectStore:
    """`file:///path` or a plain path; other schemes arrive with their backends."""
    if url.startswith("file://"):
        return LocalObjectStore(Path(url[len("file://") :]))
    if "://" in url:
        raise ValueError(f"unsupported model repository URL {url!r} (supported: file://, a path)")
    return LocalObjectStore(Path(url).expanduser())


@dataclass(frozen=True)
class ManifestFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    kind: str  # "file" (the model is its one file) or "dir"
    files: tuple[ManifestFile, ...]

    def __post_init__(self) -> None:
        check_manifest(self)  # so no manifest that escapes its directory exists at all

    def to_bytes(self) -> bytes:
        data = {"kind": self.kind, "files": [f.__dict__ for f in self.files]}
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            data = orjson.loads(raw)
            return cls(data["kind"], tuple(ManifestFile(**f) for f in data["files"]))
        except InvalidManifest:
            raise
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidManifest(f"malformed manifest: {exc}") from None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def blob_key(digest: str) -> str:
    return f"blobs/sha256/{digest}"


def manifest_key(digest: str) -> str:
    return f"manifests/sha256/{digest}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ModelRepository:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def push(self, path: Path) -> Manifest:
        """Upload a model file or directory (hidden files skipped); returns its manifest."""
        if path.is_file():
            files = [(path.name, path)]
        else:
            files = [
                (p.relative_to(path).as_posix(), p)
                for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
        if not files:
            raise ValueError(f"{path}: no files to push")
        entries = []
        for rel, file in files:
            digest = file_sha256(file)
            if not self.store.exists(blob_key(digest)):  # content-addressed: shared files upload once
                self.store.put(blob_key(digest), file)
            entries.append(ManifestFile(rel, digest, file.stat().st_size))
        manifest = Manifest("file" if path.is_file() else "dir", tuple(entries))
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"budrt-manifest-{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(manifest.to_bytes())
            self.store.put(manifest_key(manifest.digest), tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return manifest

    def manifest(self, digest: str) -> Manifest:
        with self.store.open(manifest_key(digest)) as f:
            raw = f.read()
        if hashlib.sha256(raw).hexdigest() != digest:
            raise ArtifactCorrupt(f"manifest {digest[:12]}: digest mismatch in the repository")
        return Manifest.from_bytes(raw)

    def remove(self, digest: str) -> None:
        """Delete a manifest and the blobs no other manifest uses."""
        doomed = {f.sha256 for f in self.manifest(digest).files}
        self.store.delete(manifest_key(digest))
        for key in self.store.keys("manifests/sha256"):
            other = key.rsplit("/", 1)[-1]
            try:
                doomed -= {f.sha256 for f in self.manifest(other).files}
            except (ArtifactCorrupt, FileNotFoundError, ValueError):
                continue
        for blob in doomed:
            self.store.delete(blob_key(blob))


class ArtifactCorrupt(Exception):
    """Bytes whose sha256 is not the one they were stored under."""


class InvalidManifest(ValueError):
    """A manifest that is malformed or names a file outside its artifact's directory."""


def check_path(path: object) -> str:
    """`path` if it is a plain, normalized, relative POSIX path; InvalidManifest if not.

    Manifest paths are joined to a directory when an artifact is materialized, so anything that
    could resolve elsewhere (absolute, `..`, backslashes, NUL, `.` or empty parts) is refused.
    """
    if not isinstance(path, str) or not path:
        raise InvalidManifest(f"manifest path {path!r} must be a non-empty string")
    if "\0" in path or "\\" in path:
        raise InvalidManifest(f"manifest path {path!r} contains a NUL or a backslash")
    if path.startswith("/"):
        raise InvalidManifest(f"manifest path {path!r} is absolute")
    parts = path.split("/")
    if ".." in parts:
        raise InvalidManifest(f"manifest path {path!r} leaves the artifact directory ('..')")
    if posixpath.normpath(path) != path or "." in parts:
        raise InvalidManifest(f"manifest path {path!r} is not normalized")
    if parts[0] == CACHE_MANIFEST:
        raise InvalidManifest(f"manifest path {path!r} is reserved")
    return path


def check_manifest(manifest: Manifest) -> None:
    """Every field well-formed, every path safe, no path twice or both a file and a directory."""
    if manifest.kind not in KINDS:
        raise InvalidManifest(f"manifest kind {manifest.kind!r} is not one of {', '.join(KINDS)}")
    if not manifest.files or (manifest.kind == "file" and len(manifest.files) != 1):
        raise InvalidManifest(f"a {manifest.kind!r} manifest with {len(manifest.files)} files")
    seen: set[str] = set()
    for item in manifest.files:
        path = check_path(item.path)
        digest = item.sha256
        if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise InvalidManifest(f"manifest file {path!r}: sha256 {digest!r} is not 64 hex digits")
        if not isinstance(item.size, int) or isinstance(item.size, bool) or item.size < 0:
            raise InvalidManifest(f"manifest file {path!r}: size {item.size!r} is not a byte count")
        if path in seen:
            raise InvalidManifest(f"manifest path {path!r} is listed twice")
        seen.add(path)
    for path in seen:
        parent = posixpath.dirname(path)
        while parent:
            if parent in seen:
                raise InvalidManifest(f"manifest path {parent!r} is both a file and a directory")
            parent = posixpath.dirname(parent)
