"""The model repository: model files, content-addressed, in an object store.

Layout (any `ObjectStore` of store/objects.py): `blobs/sha256/<hex>` holds one file's bytes;
`manifests/sha256/<hex>` a JSON list of (relative path, sha256, size) - one entry for a
single-file model (GGUF), one per file for a directory. A model's digest is its manifest's sha256,
so one digest pins every byte. `store_for_url` opens the store a repository URL names: a local
directory (`file://`, a path) or an S3 bucket and prefix (`s3://`).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import orjson

from budrt.config import Settings
from budrt.store.objects import LocalObjectStore, ObjectStore

CHUNK = 1 << 20
CACHE_MANIFEST = ".manifest.json"  # where an artifact cache entry keeps its manifest (reserved)
KINDS = ("file", "dir")
BLOB_TYPE = "application/octet-stream"
MANIFEST_TYPE = "application/json"


def store_for_url(url: str, settings: Settings) -> ObjectStore:
    """The object store of a repository URL: `file:///path` or a plain path (a local directory),
    or `s3://bucket/prefix` (that bucket and prefix, reached with `settings.objects.s3`'s endpoint,
    region, credentials and CA bundle)."""
    if url.startswith("file://"):
        return LocalObjectStore(Path(url[len("file://") :]))
    if url.startswith("s3://"):
        parts = urlsplit(url)
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"model repository URL {url!r}: expected s3://bucket[/prefix]")
        # Imported here: boto3 takes a while to import and a local repository never needs it.
        from budrt.store.s3_objects import S3ObjectStore

        s3 = settings.objects.s3.model_copy(update={"bucket": parts.netloc, "prefix": parts.path.strip("/")})
        return S3ObjectStore(s3)
    if "://" in url:
        raise ValueError(f"unsupported model repository URL {url!r} (supported: file://, s3://, a path)")
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


Progress = Callable[[str, int], None]  # (what: "read" | "upload", bytes since the last call)


def file_sha256(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress is not None:
                progress("read", len(chunk))
    return h.hexdigest()


def files_to_push(path: Path) -> list[tuple[str, Path]]:
    """(path in the manifest, file) of what `push` uploads: the file, or a directory's files but
    hidden ones, in order."""
    if path.is_file():
        return [(path.name, path)]
    return [
        (p.relative_to(path).as_posix(), p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]


class ModelRepository:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def open_blob(self, digest: str) -> BinaryIO:
        """A stream of the file stored as `digest` (the caller closes it); FileNotFoundError if none."""
        stream = self.store.open(blob_key(digest))
        if stream is None:
            raise FileNotFoundError(f"blob {digest[:12]} is not in the model repository")
        return stream

    def push(self, path: Path, progress: Progress | None = None) -> Manifest:
        """Upload a model file or directory (hidden files skipped); returns its manifest.
        `progress` hears of every chunk read (to hash it) and every file uploaded (or found
        already there), so a person watching sees both passes over the bytes."""
        files = files_to_push(path)
        if not files:
            raise ValueError(f"{path}: no files to push")
        entries = []
        for rel, file in files:
            digest = file_sha256(file, progress)
            if self.store.head(blob_key(digest)) is None:  # content-addressed: shared files upload once
                self.store.put_file(blob_key(digest), file, BLOB_TYPE)
            size = file.stat().st_size
            if progress is not None:
                progress("upload", size)
            entries.append(ManifestFile(rel, digest, size))
        manifest = Manifest("file" if path.is_file() else "dir", tuple(entries))
        # After its blobs: a manifest in the store names only files that are there.
        self.store.put(manifest_key(manifest.digest), manifest.to_bytes(), MANIFEST_TYPE)
        return manifest

    def manifest(self, digest: str) -> Manifest:
        """The manifest stored as `digest`, checked against it; FileNotFoundError if there is none."""
        stored = self.store.get(manifest_key(digest))
        if stored is None:
            raise FileNotFoundError(f"manifest {digest[:12]} is not in the model repository")
        raw = stored.data
        if hashlib.sha256(raw).hexdigest() != digest:
            raise ArtifactCorrupt(f"manifest {digest[:12]}: digest mismatch in the repository")
        return Manifest.from_bytes(raw)

    def remove(self, digest: str) -> None:
        """Delete a manifest and the blobs no other manifest uses."""
        doomed = {f.sha256 for f in self.manifest(digest).files}
        self.store.delete(manifest_key(digest))
        for info in self.store.list("manifests/sha256/"):
            other = info.key.rsplit("/", 1)[-1]
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
