"""Lines of an append-only file sealed one by one (the usage spool): AES-256-GCM under the file's
data key, a random 96-bit nonce per line, the file's name as associated data.

Each line is written with one `write()` and must be readable on its own after a crash (a torn
last line is skipped, the others stay good), so lines cannot share a stream like the segments
of `envelope.py`. The name in the associated data makes a line copied into another file fail.

    sealed line = base64url(nonce (12) | ciphertext | tag (16)) + "\\n"
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from budrt.security.envelope import IntegrityError

NONCE_SIZE = 12


class LineSealer:
    def __init__(self, data_key: bytes, name: str) -> None:
        self._key = data_key
        self._aead = AESGCM(data_key)
        self.name = name
        self._aad = name.encode()

    def renamed(self, name: str) -> LineSealer:
        """The same key for the file `name` (a process's segments share one data key)."""
        return LineSealer(self._key, name)

    def seal(self, line: bytes) -> bytes:
        """`line` (without its newline) sealed, as one ASCII line ending in a newline."""
        nonce = os.urandom(NONCE_SIZE)
        return base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, line, self._aad)) + b"\n"

    def open(self, sealed: bytes) -> bytes:
        """The line `seal` was given; IntegrityError when it was changed, torn or moved."""
        try:
            raw = base64.urlsafe_b64decode(sealed.strip())
        except (binascii.Error, ValueError):
            raise IntegrityError(f"a line of {self.name} is not base64") from None
        if len(raw) < NONCE_SIZE + 16:
            raise IntegrityError(f"a line of {self.name} is too short")
        try:
            return self._aead.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], self._aad)
        except InvalidTag:
            raise IntegrityError(f"a line of {self.name} failed authentication") from None
