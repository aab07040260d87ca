"""API-key material: generation, HMAC hashing and the server secret.

Keys are stored only as HMAC-SHA256(secret, key): a leaked database alone cannot be used
to authenticate, and lookups stay a single indexed equality match.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from budrt.config import Settings
from budrt.security.files import private_dir, private_file

KEY_PREFIX = "budrt-"
PREFIX_LEN = 12  # characters of a key shown in listings to tell keys apart
_SECRET_FILE = "secret.key"
_SECRET_BYTES = 32


def generate_api_key() -> str:
    """A new plaintext key: `budrt-` + 32 random bytes, base64url (43 chars)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


# What a key can look like: generated ones are `budrt-` + 43 base64url characters; a chosen
# BUDRT_ADMIN_KEY may be 16-128 of them. Anything else is refused without a database read.
KEY_SHAPE = re.compile(r"budrt-[A-Za-z0-9_-]{16,128}")
MAX_KEY_LEN = 6 + 128


def well_formed(key: str) -> bool:
    return len(key) <= MAX_KEY_LEN and KEY_SHAPE.fullmatch(key) is not None


def key_prefix(key: str) -> str:
    return key[:PREFIX_LEN]


def hash_api_key(key: str, secret: bytes) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def load_or_create_secret(settings: Settings) -> bytes:
    """`settings.secret_key` if set, else `$home/secret.key`, created on first use."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    path = Path(settings.home) / _SECRET_FILE
    try:
        private_file(path)  # made 0644 by hand or by an older budrt: no longer readable by others
        return _read_secret(path)
    except FileNotFoundError:
        pass
    private_dir(path.parent)
    # Write a private temp file, then link it into place: link() fails if another process
    # won the race, and then everyone reads the winner's secret, never a half-written one.
    tmp = path.with_name(f".{_SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(_SECRET_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) < 16:
        raise RuntimeError(f"{path}: secret is too short; delete it to generate a new one")
    return data
