"""Files that hold secrets, and the directories they live in, are private to their owner.

Every place that creates `$BUDRT_HOME`, `run/`, the metadata DB, key files or runtime files goes
through here: directories 0700, files 0600, and an existing one with wider permissions (made by
an older budrt, a copy, another umask) is narrowed, not trusted.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# Key files in `$BUDRT_HOME` (the SQLite DB is narrowed where it is opened: store/db.py).
HOME_FILES = ("secret.key", "admin.key")


def _narrow(path: Path, mode: int) -> None:
    """chmod to `mode` if group or others have any access now (a missing path is left alone)."""
    try:
        current = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return
    if current & 0o077:
        os.chmod(path, current & mode)


def private_dir(path: Path) -> Path:
    """Create `path` (and its parents) if missing; the directory itself is 0700."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    _narrow(path, PRIVATE_DIR)
    return path


def private_file(path: Path) -> None:
    """An existing file is narrowed to 0600 (its owner's bits only)."""
    _narrow(path, PRIVATE_FILE)


def touch_private(path: Path) -> None:
    """Create an empty 0600 file if missing (e.g. before SQLite opens it), else narrow it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
    os.close(fd)
    private_file(path)


def write_private(
    path: Path,
    data: bytes | Callable[[BinaryIO], object],
    *,
    durable: bool = False,
    mode: int = PRIVATE_FILE,
) -> None:
    """Replace `path` atomically with a 0600 file holding `data` (bytes, or what `data(file)`
    writes): a reader never sees a partial file, and the old file's permissions do not carry
    over. `durable`: fsync the file before the rename and the directory after it, so that the
    new file survives a power loss (keyrings, stored objects, certificates). `mode`: another
    mode for a file that is not secret (a certificate: 0644), set whatever the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != PRIVATE_FILE:
                os.fchmod(f.fileno(), mode)
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def secure_home(home: Path) -> Path:
    """`$BUDRT_HOME` and `run/` 0700, every private file in them 0600; creates the home."""
    private_dir(home)
    run = home / "run"
    if run.exists():
        private_dir(run)
        for path in run.iterdir():
            if path.is_file():
                private_file(path)
    for name in HOME_FILES:
        private_file(home / name)
    return home
