"""Object storage for what the gateway serves back later (generated images): put, get, delete, list.

`ObjectStore` is shaped after S3 (flat keys with `/` in them, a content type per object, listing
by key prefix), so an S3 backend can stand in for `LocalObjectStore`. Every method blocks: async
callers run them in a thread (`asyncio.to_thread`).

`LocalObjectStore` keeps object `a/b.png` in `<root>/a/b.png` and its content type in the sidecar
`<root>/a/.b.png.type`. Each file is written to a temporary file and renamed into place, so a
reader sees a whole object or none; the type is written before the bytes, so a visible object
always has one. Directories are 0700, files 0600. No key has a path component starting with `.`,
so neither sidecars nor temporary files can collide with an object.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from budrt.config import Settings
from budrt.security.files import PRIVATE_DIR, PRIVATE_FILE, private_dir

MAX_KEY_LEN = 1024  # as S3
_KEY = re.compile(r"[A-Za-z0-9._/-]+")
DEFAULT_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # unix time of the last put


@dataclass(frozen=True, slots=True)
class StoredObject:
    data: bytes
    content_type: str
    size: int
    modified: float


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> StoredObject | None: ...

    def delete(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[ObjectInfo]: ...


def check_key(key: str) -> str:
    """`key` if it is a valid object key, else ValueError: `[A-Za-z0-9._/-]`, at most MAX_KEY_LEN,
    relative, and no component empty or starting with `.` (no `..`, no hidden files)."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LEN or _KEY.fullmatch(key) is None:
        raise ValueError(f"invalid object key {key[:80]!r}" if isinstance(key, str) else "invalid object key")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise ValueError(f"invalid object key {key[:80]!r}")
    return key


def _type_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.type")


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` in a new 0600 file renamed over `path`, after fsync: never a partial file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        self._make_dirs(path.parent)
        _write_atomic(_type_path(path), content_type.encode())
        _write_atomic(path, data)

    def get(self, key: str) -> StoredObject | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            content_type = _type_path(path).read_text().strip() or DEFAULT_TYPE
        except FileNotFoundError:
            content_type = DEFAULT_TYPE
        return StoredObject(data, content_type, len(data), modified)

    def delete(self, key: str) -> bool:
        """Whether the object existed."""
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
        _type_path(path).unlink(missing_ok=True)
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` (a plain string prefix, as in S3), by key."""
        directory = prefix.rpartition("/")[0]
        if directory:
            check_key(directory)
        start = self.root / directory if directory else self.root
        found = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):  # a content-type sidecar or a temporary file
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


def make_object_store(settings: Settings) -> ObjectStore:
    """The store `settings.objects` names (`local`: under `path`, default `$home/objects`)."""
    config = settings.objects
    return LocalObjectStore(Path(config.path) if config.path is not None else Path(settings.home) / "objects")
