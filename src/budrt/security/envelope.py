"""Streaming authenticated encryption of one object under its own data key (AES-256-GCM).

Model files are larger than memory, so the plaintext is cut into segments (64 KiB by default),
each sealed on its own, and both directions run in a stream, holding two segments at most.

Layout: a 20-byte header, then the segments, each its ciphertext followed by a 16-byte GCM tag.

    header = magic "BUDRTENV" (8) | format version 1 (1) | segment size, u32 big-endian (4)
             | nonce prefix, random (7)
    nonce of segment i (from 0) = nonce prefix (7) | i, u32 big-endian (4) | 1 if last else 0 (1)
    associated data of every segment = header (20) | aad (the caller's, e.g. the object key)

Every segment but the last holds exactly `segment size` plaintext bytes; the last holds 0 to
`segment size` (an empty plaintext is one empty last segment). So:
- the counter in the nonce makes dropped, repeated or reordered segments fail;
- the last-segment flag makes truncation at a segment boundary and appended bytes fail (the
  segment before the cut was sealed as "not last");
- the header in the associated data makes a changed header (segment size, prefix) fail;
- `aad` makes the bytes of one object fail under another object's name, even when both were
  (wrongly) sealed with the same data key.
Any failure raises `IntegrityError` naming the segment and the object; no unauthenticated byte
is ever returned. A stream reader hands out each segment only after it authenticated, so a
consumer may have read earlier, authentic segments before a later one fails: it must treat the
error as the whole object failing.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"BUDRTENV"
FORMAT_VERSION = 1
SEGMENT_SIZE = 64 * 1024
MIN_SEGMENT_SIZE = 16
MAX_SEGMENT_SIZE = 16 * 1024 * 1024  # the header is read before it is authenticated: bound it
TAG_SIZE = 16
KEY_SIZE = 32
PREFIX_SIZE = 7
_HEADER = struct.Struct(f">{len(MAGIC)}sBI{PREFIX_SIZE}s")
HEADER_SIZE = _HEADER.size  # 20
MAX_SEGMENTS = 1 << 32  # the counter's range


class IntegrityError(Exception):
    """Stored bytes or a wrapped key failed authentication: tampered with, truncated, swapped
    with another object's, or read with the wrong key or context."""


@dataclass(frozen=True, slots=True)
class _Header:
    segment_size: int
    prefix: bytes

    @classmethod
    def new(cls, segment_size: int) -> _Header:
        _check_segment_size(segment_size)
        return cls(segment_size, os.urandom(PREFIX_SIZE))

    @classmethod
    def parse(cls, raw: bytes, name: str) -> _Header:
        if len(raw) < HEADER_SIZE:
            raise IntegrityError(f"{name}: truncated header ({len(raw)} bytes)")
        magic, version, segment_size, prefix = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise IntegrityError(f"{name}: not an encrypted object (bad magic)")
        if version != FORMAT_VERSION:
            raise IntegrityError(f"{name}: envelope format version {version} is not supported")
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise IntegrityError(f"{name}: header names an invalid segment size {segment_size}")
        return cls(segment_size, prefix)

    @property
    def raw(self) -> bytes:
        return _HEADER.pack(MAGIC, FORMAT_VERSION, self.segment_size, self.prefix)

    def nonce(self, index: int, last: bool) -> bytes:
        if index >= MAX_SEGMENTS:
            raise ValueError("too many segments for one envelope")
        return self.prefix + struct.pack(">IB", index, 1 if last else 0)


def _check_segment_size(segment_size: int) -> None:
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment size {segment_size} not in [{MIN_SEGMENT_SIZE}, {MAX_SEGMENT_SIZE}]")


def _cipher(data_key: bytes) -> AESGCM:
    if len(data_key) != KEY_SIZE:
        raise ValueError(f"a data key is {KEY_SIZE} bytes, not {len(data_key)}")
    return AESGCM(data_key)


def _read_exact(src: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of `src` (a raw stream may return short reads)."""
    chunks = []
    while size > 0:
        chunk = src.read(size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _name(aad: bytes, name: str | None) -> str:
    return name if name is not None else aad.decode("ascii", "replace")


def encrypt_stream(
    src: BinaryIO, dst: BinaryIO, data_key: bytes, aad: bytes, segment_size: int = SEGMENT_SIZE
) -> int:
    """Encrypt everything `src` holds into `dst`; returns the ciphertext bytes written."""
    cipher = _cipher(data_key)
    header = _Header.new(segment_size)
    associated = header.raw + aad
    dst.write(header.raw)
    written = HEADER_SIZE
    current, index = _read_exact(src, segment_size), 0
    while True:
        # Read one segment ahead: a segment is "last" only when nothing follows it.
        following = _read_exact(src, segment_size) if len(current) == segment_size else b""
        last = not following
        sealed = cipher.encrypt(header.nonce(index, last), current, associated)
        dst.write(sealed)
        written += len(sealed)
        if last:
            return written
        current, index = following, index + 1


class DecryptingReader(io.BufferedIOBase):
    """The plaintext of an envelope read from `src`, a segment at a time (`src` is closed with it).

    The first segment is authenticated here, in the constructor: the wrong key, another object's
    bytes or a bad header fail at once rather than at the first read.
    """

    def __init__(self, src: BinaryIO, data_key: bytes, aad: bytes, name: str | None = None) -> None:
        super().__init__()
        self._src = src
        self._name = _name(aad, name)
        self._index = 0
        self._done = False
        self._offset = 0
        try:
            self._cipher = _cipher(data_key)
            self._header = _Header.parse(_read_exact(src, HEADER_SIZE), self._name)
            self._associated = self._header.raw + aad
            self._sealed_size = self._header.segment_size + TAG_SIZE
            self._pending = _read_exact(src, self._sealed_size)  # the next sealed segment
            self._buffer = self._next_segment()
        except BaseException:
            src.close()  # the reader owns `src`, also when it fails to start
            raise

    def readable(self) -> bool:
        return True

    def _next_segment(self) -> bytes:
        """Authenticate and decrypt the next segment; b"" once the last one was read."""
        if self._done:
            return b""
        current = self._pending
        full = len(current) == self._sealed_size
        self._pending = _read_exact(self._src, self._sealed_size) if full else b""
        last = not self._pending
        where = f"segment {self._index + 1} of {self._name}"
        if len(current) < TAG_SIZE:
            raise IntegrityError(f"{where} is truncated ({len(current)} bytes)")
        try:
            plain = self._cipher.decrypt(self._header.nonce(self._index, last), current, self._associated)
        except InvalidTag:
            raise IntegrityError(f"{where} failed authentication") from None
        except ValueError as exc:  # more segments than the counter allows
            raise IntegrityError(f"{where}: {exc}") from None
        self._index += 1
        self._done = last
        return plain

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed reader")
        if size is None or size < 0:
            return self._read_all()
        parts: list[bytes] = []
        while size > 0:
            if self._offset >= len(self._buffer):
                self._buffer, self._offset = self._next_segment(), 0
                if not self._buffer:
                    break
            part = self._buffer[self._offset : self._offset + size]
            self._offset += len(part)
            size -= len(part)
            parts.append(part)
        return b"".join(parts)

    def _read_all(self) -> bytes:
        parts = [self._buffer[self._offset :]]
        while chunk := self._next_segment():
            parts.append(chunk)
        self._buffer, self._offset = b"", 0
        return b"".join(parts)

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._src.close()
            finally:
                super().close()


def decrypt_stream(src: BinaryIO, dst: BinaryIO, data_key: bytes, aad: bytes, name: str | None = None) -> int:
    """Decrypt the envelope in `src` into `dst`; returns the plaintext bytes written. On
    IntegrityError `dst` may hold the authentic segments before the failing one: discard it."""
    reader = DecryptingReader(src, data_key, aad, name)
    written = 0
    while chunk := reader.read(SEGMENT_SIZE):
        dst.write(chunk)
        written += len(chunk)
    return written


def encrypt_bytes(plaintext: bytes, data_key: bytes, aad: bytes, segment_size: int = SEGMENT_SIZE) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(plaintext), out, data_key, aad, segment_size)
    return out.getvalue()


def decrypt_bytes(ciphertext: bytes, data_key: bytes, aad: bytes, name: str | None = None) -> bytes:
    """The whole plaintext, or IntegrityError: nothing is returned unless every segment passed."""
    return DecryptingReader(io.BytesIO(ciphertext), data_key, aad, name).read()


def ciphertext_size(plain: int, segment_size: int = SEGMENT_SIZE) -> int:
    """The envelope's size for `plain` plaintext bytes."""
    segments = max(1, -(-plain // segment_size))
    return HEADER_SIZE + plain + segments * TAG_SIZE


def plaintext_size(cipher: int, segment_size: int = SEGMENT_SIZE) -> int:
    """The plaintext size of a `cipher`-byte envelope; ValueError for a size no envelope has."""
    body = cipher - HEADER_SIZE
    full, rest = divmod(body, segment_size + TAG_SIZE)
    if body < TAG_SIZE or 0 < rest < TAG_SIZE:
        raise ValueError(f"{cipher} bytes is not the size of an envelope")
    segments = full + (1 if rest else 0)
    return body - segments * TAG_SIZE
