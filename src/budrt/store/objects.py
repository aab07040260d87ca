"""Object storage: generated images, the model repository's files; put, get, open, head, list,
delete, presign.

`ObjectStore` is shaped after S3 (flat keys with `/` in them, a content type and a little
user metadata per object, listing by key prefix), with two backends: `LocalObjectStore` here and
`S3ObjectStore` (store/s3_objects.py). `EncryptedObjectStore` (store/encrypted_objects.py) wraps
either one to encrypt every object; store/object_stores.py picks and wraps them from the
settings. Every method blocks: async callers run them in a thread (`asyncio.to_thread`).

`LocalObjectStore` keeps object `a/b.png` in `<root>/a/b.png` and its content type and metadata
in the sidecar `<root>/a/.b.png.meta` (JSON). Each file is written to a temporary file and renamed
into place, so a reader sees a whole object or none; the sidecar is written before the bytes, so
a visible object always has one. Directories are 0700, files 0600. No key has a path component
starting with `.`, so neither sidecars nor temporary files can collide with an object.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import orjson

from budrt.security.files import PRIVATE_DIR, private_dir, write_private

MAX_KEY_LEN = 1024  # as S3
_KEY = re.compile(r"[A-Za-z0-9._/-]+")
_META_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
MAX_METADATA_BYTES = 2048  # S3's limit on user metadata, names and values together
DEFAULT_TYPE = "application/octet-stream"
CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int  # bytes as stored
    modified: float  # unix time of the last put


@dataclass(frozen=True, slots=True)
class ObjectHead:
    key: str
    size: int
    modified: float
    content_type: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredObject:
    data: bytes
    content_type: str
    size: int
    modified: float
    metadata: Mapping[str, str] = field(default_factory=dict)


class ObjectStore(Protocol):
    def put(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Store `data` under `key`, replacing any object there (readers see old or new, whole)."""

    def put_file(
        self, key: str, source: Path, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        """As `put`, streaming the file at `source` (model files are larger than memory)."""

    def get(self, key: str) -> StoredObject | None: ...

    def open(self, key: str) -> BinaryIO | None:
        """A stream of the object's bytes (the caller closes it), or None if there is none."""

    def head(self, key: str) -> ObjectHead | None: ...

    def set_metadata(self, key: str, metadata: Mapping[str, str]) -> bool:
        """Replace the object's metadata, leaving its bytes as they are; False if there is none."""

    def delete(self, key: str) -> bool:
        """Whether the object existed."""

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` (a plain string prefix, as in S3), by key."""

    def presign(self, key: str, expires_s: int) -> str | None:
        """A URL that serves the object for `expires_s` seconds, or None where the backend has none."""


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """`metadata` as a dict if S3 would take it as user metadata: lowercase names of
    `[a-z0-9-]`, printable ASCII values, 2 KiB in all; else ValueError."""
    checked = dict(metadata or {})
    total = 0
    for name, value in checked.items():
        if not isinstance(name, str) or _META_NAME.fullmatch(name) is None:
            raise ValueError(f"invalid metadata name {str(name)[:40]!r}")
        if not isinstance(value, str) or not value.isascii() or not value.isprintable():
            raise ValueError(f"metadata {name!r}: the value must be printable ASCII")
        total += len(name) + len(value)
    if total > MAX_METADATA_BYTES:
        raise ValueError(f"metadata of {total} bytes (at most {MAX_METADATA_BYTES})")
    return checked


def check_key(key: str) -> str:
    """`key` if it is a valid object key, else ValueError: `[A-Za-z0-9._/-]`, at most MAX_KEY_LEN,
    relative, and no component empty or starting with `.` (no `..`, no hidden files)."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LEN or _KEY.fullmatch(key) is None:
        raise ValueError(f"invalid object key {key[:80]!r}" if isinstance(key, str) else "invalid object key")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise ValueError(f"invalid object key {key[:80]!r}")
    return key


def _meta_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.meta")


class LocalObjectStore:
    """Objects as files under `root` (see the module's docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _make_dirs(self, directory: Path) -> None:
        """`directory` and every missing one between it and the root, each 0700."""
        private_dir(self.root)
        current = self.root
        for part in directory.relative_to(self.root).parts:
            current = current / part
            current.mkdir(mode=PRIVATE_DIR, exist_ok=True)

    def _write_meta(self, path: Path, content_type: str, metadata: Mapping[str, str] | None) -> None:
        sidecar = orjson.dumps({"content_type": content_type, "metadata": check_metadata(metadata)})
        write_private(_meta_path(path), sidecar, durable=True)

    def _read_meta(self, path: Path) -> tuple[str, dict[str, str]]:
        try:
            sidecar = orjson.loads(_meta_path(path).read_bytes())
            return str(sidecar.get("content_type") or DEFAULT_TYPE), dict(sidecar.get("metadata") or {})
        except (FileNotFoundError, orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return DEFAULT_TYPE, {}

    def put(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        path = self._path(key)
        self._make_dirs(path.parent)
        self._write_meta(path, content_type, metadata)
        write_private(path, data, durable=True)

    def put_file(
        self, key: str, source: Path, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        path = self._path(key)
        self._make_dirs(path.parent)
        self._write_meta(path, content_type, metadata)
        with open(source, "rb") as src:
            write_private(path, lambda f: shutil.copyfileobj(src, f, CHUNK), durable=True)

    def open(self, key: str) -> BinaryIO | None:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def get(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        content_type, metadata = self._read_meta(path)
        return StoredObject(data, content_type, len(data), modified, metadata)

    def head(self, key: str) -> ObjectHead | None:
        path = self._path(key)
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        content_type, metadata = self._read_meta(path)
        return ObjectHead(key, stat.st_size, stat.st_mtime, content_type, metadata)

    def set_metadata(self, key: str, metadata: Mapping[str, str]) -> bool:
        path = self._path(key)
        if not path.is_file():
            return False
        content_type, _ = self._read_meta(path)
        self._write_meta(path, content_type, metadata)
        return True

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        _meta_path(path).unlink(missing_ok=True)
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        directory = prefix.rpartition("/")[0]
        if directory:
            check_key(directory)
        start = self.root / directory if directory else self.root
        found = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):  # a metadata sidecar or a temporary file
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:  # deleted meanwhile
                    continue
                found.append(ObjectInfo(key, stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda info: info.key)

    def presign(self, key: str, expires_s: int) -> str | None:
        return None  # files are served by the gateway's signed links (security/signed_urls.py)
