"""Envelope encryption of every object: an `ObjectStore` over another one.

Each put draws a fresh data key from the key provider (security/kms.py), bound to the object's
key by the context `{"budrt-object": key}`; the inner store receives only the envelope
(security/envelope.py, whose associated data is the object's key as well) and, in the object's
metadata beside the caller's own, the wrapped data key and the plaintext size:

    budrt-wrap-provider, budrt-wrap-key-id, budrt-wrap-version, budrt-wrap-blob, budrt-size

Names starting `budrt-` are ours: a caller's metadata may not use them, and ours takes some 200
(local keyring) to 550 (AWS KMS) of the 2 KiB that metadata may hold. So the bytes of one
object moved under another key fail, as does any change to them; `head` and `get` report the
plaintext size and the caller's metadata only. What is not protected: the content type and the
caller's metadata (stored in clear, unauthenticated, as before), and `list`, which passes the
inner store's listing through with the sizes as stored (ciphertext: 20 bytes of header and 16 per
64 KiB segment more than the plaintext). `presign` returns None: a presigned URL would serve the
ciphertext, so objects are served through the gateway's signed links instead.

An object without our metadata (stored before encryption was turned on) is refused with
IntegrityError, unless the store is built with `allow_plaintext=True`: then it is read as it is,
which also lets an attacker with write access to the inner store plant plaintext. Turn it on only
while old objects remain, and not for longer.

`rewrap` moves wrapped keys to the provider's current key version after a rotation by rewriting
the metadata alone (`set_metadata`): the bulk bytes stay as they are.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, TypeVar

from budrt.security.envelope import (
    DecryptingReader,
    IntegrityError,
    decrypt_bytes,
    encrypt_bytes,
    encrypt_stream,
    plaintext_size,
)
from budrt.security.files import private_dir
from budrt.security.kms import KeyProvider, KmsError, WrappedKey
from budrt.store.objects import (
    ObjectHead,
    ObjectInfo,
    ObjectStore,
    StoredObject,
    check_key,
    check_metadata,
)

RESERVED = "budrt-"
WRAP = "budrt-wrap-"
SIZE = "budrt-size"
CONTEXT = "budrt-object"
_T = TypeVar("_T")


def _context(key: str) -> dict[str, str]:
    return {CONTEXT: key}


def _caller_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's metadata, checked as the inner store would, with our prefix refused."""
    checked = check_metadata(metadata)
    for name in checked:
        if name.startswith(RESERVED):
            raise ValueError(f"metadata name {name!r}: the {RESERVED} prefix is reserved")
    return checked


def _split(metadata: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the caller's metadata, ours)."""
    caller = {name: value for name, value in metadata.items() if not name.startswith(RESERVED)}
    ours = {name: value for name, value in metadata.items() if name.startswith(RESERVED)}
    return caller, ours


def _sealed_metadata(caller: dict[str, str], wrapped: WrappedKey, size: int) -> dict[str, str]:
    """The caller's metadata and ours, within the inner store's limits (ValueError if not)."""
    return check_metadata({**caller, **wrapped.to_metadata(WRAP), SIZE: str(size)})


def _twice(read: Callable[[], _T]) -> _T:
    """`read()`, once more after an IntegrityError: the inner store writes an object's metadata
    and bytes one after the other, so a read racing an overwrite of the same key may pair the
    new wrapped key with the old bytes. Real tampering fails both times."""
    try:
        return read()
    except IntegrityError:
        return read()


class EncryptedObjectStore:
    """Every object of `inner` encrypted under its own data key from `provider` (module doc).

    `temp_dir`: where `put_file` stages the ciphertext before handing it to `inner` (None: the
    system's temporary directory); it must hold a whole object, so not a small tmpfs for models.
    """

    def __init__(
        self,
        inner: ObjectStore,
        provider: KeyProvider,
        *,
        allow_plaintext: bool = False,
        temp_dir: Path | None = None,
    ) -> None:
        self.inner = inner
        self.provider = provider
        self.allow_plaintext = allow_plaintext
        self.temp_dir = temp_dir

    def _wrapped(self, key: str, metadata: Mapping[str, str]) -> tuple[WrappedKey, int] | None:
        """Our wrapped key and plaintext size from an object's metadata; None for a plaintext
        object that may be read as it is; IntegrityError for one that may not."""
        _, ours = _split(metadata)
        if not ours:
            if self.allow_plaintext:
                return None
            raise IntegrityError(f"{key} is not encrypted (stored before encryption was on?)")
        try:
            wrapped = WrappedKey.from_metadata(ours, WRAP)
        except IntegrityError as exc:
            raise IntegrityError(f"{key}: {exc}") from None
        size = ours.get(SIZE, "")
        if not size.isdigit():
            raise IntegrityError(f"{key}: the metadata's plaintext size is missing or malformed")
        return wrapped, int(size)

    def put(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        check_key(key)
        caller = _caller_metadata(metadata)
        data_key, wrapped = self.provider.generate_data_key(_context(key))
        sealed = encrypt_bytes(data, data_key, key.encode())
        self.inner.put(key, sealed, content_type, _sealed_metadata(caller, wrapped, len(data)))

    def put_file(
        self, key: str, source: Path, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Encrypt `source` into a private temporary file (deleted afterwards), then hand that on."""
        check_key(key)
        caller = _caller_metadata(metadata)
        data_key, wrapped = self.provider.generate_data_key(_context(key))
        if self.temp_dir is not None:
            private_dir(self.temp_dir)
        fd, name = tempfile.mkstemp(prefix=".budrt-seal-", dir=self.temp_dir)  # 0600
        staged = Path(name)
        try:
            with os.fdopen(fd, "wb") as dst, open(source, "rb") as src:  # fdopen owns `fd` at once
                size = plaintext_size(encrypt_stream(src, dst, data_key, key.encode()))
            self.inner.put_file(key, staged, content_type, _sealed_metadata(caller, wrapped, size))
        finally:
            staged.unlink(missing_ok=True)

    def _get_once(self, key: str) -> StoredObject | None:
        stored = self.inner.get(key)
        if stored is None:
            return None
        found = self._wrapped(key, stored.metadata)
        if found is None:
            return stored
        wrapped, size = found
        data = decrypt_bytes(stored.data, self.provider.unwrap(wrapped, _context(key)), key.encode(), key)
        if len(data) != size:
            raise IntegrityError(f"{key}: {len(data)} bytes, but its metadata says {size}")
        caller, _ = _split(stored.metadata)
        return StoredObject(data, stored.content_type, len(data), stored.modified, caller)

    def get(self, key: str) -> StoredObject | None:
        return _twice(lambda: self._get_once(key))

    def _open_once(self, key: str) -> BinaryIO | None:
        head = self.inner.head(key)
        if head is None:
            return None
        found = self._wrapped(key, head.metadata)
        stream = self.inner.open(key)
        if stream is None or found is None:
            return stream
        try:
            data_key = self.provider.unwrap(found[0], _context(key))
        except BaseException:
            stream.close()
            raise
        # The reader authenticates the first segment now (and closes `stream` if that fails).
        return DecryptingReader(stream, data_key, key.encode(), key)  # type: ignore[return-value]

    def open(self, key: str) -> BinaryIO | None:
        """A stream of the plaintext; each segment is authenticated before it is handed out."""
        return _twice(lambda: self._open_once(key))

    def head(self, key: str) -> ObjectHead | None:
        head = self.inner.head(key)
        if head is None:
            return None
        found = self._wrapped(key, head.metadata)
        if found is None:
            return head
        caller, _ = _split(head.metadata)
        return ObjectHead(key, found[1], head.modified, head.content_type, caller)

    def set_metadata(self, key: str, metadata: Mapping[str, str]) -> bool:
        """Replace the caller's metadata; ours (the wrapped key, the size) is carried over."""
        caller = _caller_metadata(metadata)
        head = self.inner.head(key)
        if head is None:
            return False
        self._wrapped(key, head.metadata)  # refuses a plaintext object unless allowed
        _, ours = _split(head.metadata)
        return self.inner.set_metadata(key, check_metadata({**caller, **ours}))

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """The inner listing as it is: sizes are the stored (ciphertext) sizes."""
        return self.inner.list(prefix)

    def presign(self, key: str, expires_s: int) -> str | None:
        return None  # the inner store's URL would serve ciphertext

    def rewrap(self, prefix: str = "") -> int:
        """Move every wrapped key under `prefix` that is not at the provider's current version to
        it, rewriting metadata only; returns how many moved. Plaintext objects are skipped.

        `set_metadata` has no compare-and-swap: the wrapped key is read again just before it is
        replaced, which narrows (but cannot close) the window in which a concurrent put of the
        same key could be paired with the old object's wrapped key."""
        current = self.provider.current_version()
        moved = 0
        for info in self.inner.list(prefix):
            try:
                moved += self._rewrap_one(info.key, current)
            except (IntegrityError, KmsError) as exc:
                raise type(exc)(f"{info.key}: {exc}") from exc
        return moved

    def _rewrap_one(self, key: str, current: str) -> int:
        head = self.inner.head(key)
        ours = _split(head.metadata)[1] if head is not None else {}
        if not ours:
            return 0  # deleted meanwhile, or plaintext
        wrapped = WrappedKey.from_metadata(ours, WRAP)
        if wrapped.version == current:
            return 0
        moved = self.provider.rewrap(wrapped, _context(key))
        if moved == wrapped:
            return 0
        latest = self.inner.head(key)
        if latest is None or _split(latest.metadata)[1] != ours:
            return 0  # replaced meanwhile: the new object has a fresh wrapped key
        metadata = {**latest.metadata, **moved.to_metadata(WRAP)}
        return 1 if self.inner.set_metadata(key, check_metadata(metadata)) else 0
