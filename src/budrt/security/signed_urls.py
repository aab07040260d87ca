"""Signed, expiring URLs: the signature in the URL is the credential (no API key needed).

`sign` is HMAC-SHA256 over a domain-separated message (a label, the path, the expiry), so a
signature made for one path or expiry is worthless for any other, and never equals any other
HMAC budrt computes. The key is derived from the server secret by HKDF-SHA256 with its own label
(`derive_key`): never the bytes that hash API keys, nor any API key's hash (which is HMAC keyed by
the secret itself).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from budrt.config import Settings
from budrt.security.keys import load_or_create_secret

_KEY_SALT = b"budrt-signed-urls"
_KEY_INFO = b"budrt signed-url key v1"
_MESSAGE_LABEL = b"budrt-image-url\n"
SIGNATURE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, url-safe base64 without padding


def derive_key(secret: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of the server secret: extract with a salt, expand one block."""
    prk = hmac.new(_KEY_SALT, secret, hashlib.sha256).digest()
    return hmac.new(prk, _KEY_INFO + b"\x01", hashlib.sha256).digest()


def url_key(settings: Settings) -> bytes:
    """The signing key of this installation: the same on every gateway sharing the secret."""
    return derive_key(load_or_create_secret(settings))


def sign(path: str, expires: int, key: bytes) -> str:
    message = _MESSAGE_LABEL + path.encode() + b"\n" + str(int(expires)).encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def verify(path: str, expires: int, signature: str, key: bytes, now: float) -> bool:
    """Whether `signature` signs `path` until `expires` (unix seconds) and that is still ahead."""
    if now >= expires or SIGNATURE.fullmatch(signature) is None:
        return False
    return hmac.compare_digest(sign(path, expires, key).encode(), signature.encode())
