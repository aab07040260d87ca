"""Key-encryption keys: the providers that wrap each object's data key, and unwrap it again.

Every object gets a fresh 256-bit data key (security/envelope.py encrypts it with that key); the
data key is stored only wrapped, under a key-encryption key that stays with the provider:
- `LocalKeyring`: a 0600 JSON file of versioned AES-256 keys (`v1`, `v2`, ...), one current;
- `AwsKms`: a KMS key in AWS, whose key material never leaves KMS.
A wrapped key names its provider, key and key version, so a rotation (a new current version)
leaves every older wrapped key readable until `rewrap` moves it, without touching the objects'
bytes. Every wrap is bound to a context (for objects `{"budrt-object": key}`): a wrapped key
unwraps only with the same context, so it cannot be moved to another object.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import secrets
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from budrt.config import Settings, reveal
from budrt.security.envelope import IntegrityError
from budrt.security.files import PRIVATE_FILE, private_dir, private_file, write_private

__all__ = [
    "AwsKms",
    "IntegrityError",
    "KeyProvider",
    "KmsError",
    "LocalKeyring",
    "WrappedKey",
    "make_key_provider",
]

DATA_KEY_SIZE = 32
NONCE_SIZE = 12
_FIELDS = ("provider", "key-id", "version", "blob")
_T = TypeVar("_T")


class KmsError(Exception):
    """A provider could not do what was asked: an unknown or retired key version, another
    provider's or keyring's wrapped key, a keyring file it cannot read, KMS refusing or down."""


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key as the provider sealed it, with what is needed to find the key that did."""

    provider: str
    key_id: str
    version: str
    blob: bytes

    def to_metadata(self, prefix: str = "") -> dict[str, str]:
        """Short printable-ASCII values (the blob in base64), to sit in object metadata."""
        for label, value in (("provider", self.provider), ("key id", self.key_id), ("version", self.version)):
            if not value or not value.isascii() or not value.isprintable():
                raise ValueError(f"wrapped key: the {label} must be printable ASCII")
        values = (self.provider, self.key_id, self.version, base64.b64encode(self.blob).decode())
        return {prefix + name: value for name, value in zip(_FIELDS, values, strict=True)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], prefix: str = "") -> WrappedKey:
        """The key `to_metadata` wrote; IntegrityError if a field is missing or malformed."""
        missing = [prefix + name for name in _FIELDS if not metadata.get(prefix + name)]
        if missing:
            raise IntegrityError(f"wrapped key metadata lacks {', '.join(missing)}")
        provider, key_id, version, blob = (metadata[prefix + name] for name in _FIELDS)
        try:
            return cls(provider, key_id, version, base64.b64decode(blob, validate=True))
        except (binascii.Error, ValueError):
            raise IntegrityError("wrapped key metadata: the blob is not base64") from None


class KeyProvider(Protocol):
    name: str

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytes, WrappedKey]:
        """A fresh 32-byte data key, and it wrapped under the current key version."""

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        """The data key; IntegrityError if `wrapped` or `context` is not what was wrapped."""

    def rewrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> WrappedKey:
        """The same data key under the current version; `wrapped` itself when already there."""

    def rotate(self) -> str:
        """Make a new key version current (older ones keep unwrapping); returns it."""

    def current_version(self) -> str: ...

    def describe(self) -> dict[str, Any]:
        """For `budrt kms status`: provider, key id, current version, versions."""


def _associated(key_id: str, version: str, context: Mapping[str, str]) -> bytes:
    """Canonical bytes of (key id, version, context): each length-prefixed, context sorted by
    name, so no two different inputs encode alike."""
    parts = [b"budrt-wrap-1", key_id.encode(), version.encode()]
    for name in sorted(context):
        parts += [name.encode(), context[name].encode()]
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def _check_provider(wrapped: WrappedKey, name: str) -> None:
    if wrapped.provider != name:
        raise KmsError(f"the data key was wrapped by provider {wrapped.provider!r}; this one is {name!r}")


@dataclass(slots=True)
class _Version:
    key: bytes
    created: float
    retired: float | None = None


@dataclass(slots=True)
class _Ring:
    id: str
    current: str
    versions: dict[str, _Version] = field(default_factory=dict)

    @classmethod
    def new(cls) -> _Ring:
        return cls(f"local-{secrets.token_hex(8)}", "v1", {"v1": _Version(os.urandom(32), time.time())})

    def to_json(self) -> bytes:
        versions = {
            name: {"key": base64.b64encode(v.key).decode(), "created": v.created, "retired": v.retired}
            for name, v in self.versions.items()
        }
        return json.dumps(
            {"format": 1, "id": self.id, "current": self.current, "versions": versions}, indent=2
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> _Ring:
        data = json.loads(raw)
        if data.get("format") != 1:
            raise ValueError(f"keyring format {data.get('format')!r} is not supported")
        versions = {
            name: _Version(base64.b64decode(v["key"], validate=True), float(v["created"]), v.get("retired"))
            for name, v in data["versions"].items()
        }
        names_ok = all(name[:1] == "v" and name[1:].isdigit() for name in versions)
        sizes_ok = all(len(v.key) == 32 for v in versions.values())
        if not names_ok or not sizes_ok or data["current"] not in versions:
            raise ValueError("inconsistent keyring (version names, current version or key sizes)")
        return cls(str(data["id"]), str(data["current"]), versions)

    def ordered(self) -> list[str]:
        return sorted(self.versions, key=lambda name: int(name.removeprefix("v")))


class LocalKeyring:
    """Versioned AES-256 key-encryption keys in a JSON file (0600, in a 0700 directory).

    Created with `v1` at first use. `rotate` adds a version and makes it current; `retire` marks
    an old one so that anything still wrapped under it is refused (`rewrap` first). Readers see
    a whole file (written to a temporary file, fsynced and renamed) and reload it when it
    changes, so a rotation by `budrt kms rotate` reaches a running server at its next wrap.
    Writers take an exclusive flock on `.<name>.lock` beside it, so two processes rotating at
    once get two distinct versions. A retired key is kept in the file (retiring is undoable by
    hand); delete it from the file to destroy it.
    """

    name = "local"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(f".{path.name}.lock")
        self._cache: tuple[tuple[int, int, int], _Ring] | None = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.path.parent)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> _Ring:
        try:
            private_file(self.path)
            return _Ring.from_json(self.path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise KmsError(f"keyring {self.path} is unreadable: {exc}") from None

    def _ring(self) -> _Ring:
        """The keyring as on disk now (cached while the file is unchanged); created if missing."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._update(lambda ring: None)  # creates it
            stat = self.path.stat()
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._cache is None or self._cache[0] != signature:
            self._cache = (signature, self._read())
        return self._cache[1]

    def _update(self, change: Callable[[_Ring], _T]) -> _T:
        """Apply `change` to the keyring on disk under the lock, and write it back."""
        with self._locked():
            ring = self._read() if self.path.exists() else _Ring.new()
            result = change(ring)
            write_private(self.path, ring.to_json(), durable=True)
            self._cache = None
            return result

    def _key(self, ring: _Ring, wrapped: WrappedKey) -> bytes:
        _check_provider(wrapped, self.name)
        if wrapped.key_id != ring.id:
            raise KmsError(f"the data key was wrapped by keyring {wrapped.key_id}; {self.path} is {ring.id}")
        version = ring.versions.get(wrapped.version)
        if version is None:
            raise KmsError(f"key version {wrapped.version!r} is not in keyring {self.path}")
        if version.retired is not None:
            raise KmsError(f"key version {wrapped.version} is retired: its data keys are refused")
        return version.key

    def _wrap(self, ring: _Ring, data_key: bytes, context: Mapping[str, str]) -> WrappedKey:
        nonce = os.urandom(NONCE_SIZE)
        associated = _associated(ring.id, ring.current, context)
        blob = nonce + AESGCM(ring.versions[ring.current].key).encrypt(nonce, data_key, associated)
        return WrappedKey(self.name, ring.id, ring.current, blob)

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytes, WrappedKey]:
        data_key = os.urandom(DATA_KEY_SIZE)
        return data_key, self._wrap(self._ring(), data_key, context)

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        key = self._key(self._ring(), wrapped)
        nonce, sealed = wrapped.blob[:NONCE_SIZE], wrapped.blob[NONCE_SIZE:]
        try:
            associated = _associated(wrapped.key_id, wrapped.version, context)
            return AESGCM(key).decrypt(nonce, sealed, associated)
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"the data key wrapped under {wrapped.version} failed authentication "
                "(another context, or a tampered blob)"
            ) from None

    def rewrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> WrappedKey:
        ring = self._ring()
        if wrapped.provider == self.name and wrapped.key_id == ring.id and wrapped.version == ring.current:
            return wrapped
        return self._wrap(ring, self.unwrap(wrapped, context), context)

    def rotate(self) -> str:
        def add(ring: _Ring) -> str:
            name = f"v{int(ring.ordered()[-1].removeprefix('v')) + 1}"
            ring.versions[name] = _Version(os.urandom(32), time.time())
            ring.current = name
            return name

        return self._update(add)

    def retire(self, version: str) -> None:
        """Refuse data keys wrapped under `version` from now on; never the current version."""

        def mark(ring: _Ring) -> None:
            if version not in ring.versions:
                raise KmsError(f"key version {version!r} is not in keyring {self.path}")
            if version == ring.current:
                raise KmsError(f"{version} is the current key version: rotate, rewrap, then retire it")
            if ring.versions[version].retired is None:
                ring.versions[version].retired = time.time()

        self._update(mark)

    def current_version(self) -> str:
        return self._ring().current

    def describe(self) -> dict[str, Any]:
        ring = self._ring()
        versions = []
        for name in ring.ordered():
            version = ring.versions[name]
            state = "current" if name == ring.current else "retired" if version.retired else "active"
            versions.append({"version": name, "state": state, "created": _iso(version.created)})
        return {
            "provider": self.name,
            "key_id": ring.id,
            "keyring": str(self.path),
            "current": ring.current,
            "versions": versions,
        }


def _iso(timestamp: float | datetime) -> str:
    moment = timestamp if isinstance(timestamp, datetime) else datetime.fromtimestamp(timestamp).astimezone()
    return moment.isoformat(timespec="seconds")


class AwsKms:
    """A symmetric KMS key in AWS KMS (boto3's `kms` client); the key material never leaves KMS.

    The wrapped key's `key_id` is the key's ARN and its `version` the key material KMS reports
    (`KeyMaterialId`), or the ARN where KMS reports none. Data keys are unwrapped and rewrapped
    only under the configured key (`KeyId` on Decrypt and ReEncrypt): a blob sealed under any
    other key, even one this principal may use, is refused.

    Rotation is AWS's: `EnableKeyRotation` rotates the material on a schedule, and `rotate()` calls
    `RotateKeyOnDemand` (on the key's ARN: it takes no alias). KMS keeps every older material, so
    blobs stay readable without a rewrap; `rewrap` (ReEncrypt) moves a blob to the current
    material, e.g. before an imported material is deleted. Rotation completes asynchronously, so
    `rotate()` may still return the old version for a while; `budrt kms status` shows it.

    moto (5.2.5, the tests' KMS) implements RotateKeyOnDemand and ListKeyRotations, but only
    records the rotation: the key material stays the same and no KeyMaterialId is reported, so
    there the version is the key's ARN, `rotate()` returns it unchanged and rewrap has no work.
    """

    name = "aws-kms"

    def __init__(
        self,
        key_id: str,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        import boto3  # only the aws-kms provider pays for importing boto3
        from botocore.config import Config

        access, secret = credentials if credentials is not None else (None, None)
        self.key_id = key_id
        self._client = boto3.client(
            "kms",
            region_name=region,
            endpoint_url=endpoint_url,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            config=Config(
                connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}
            ),
        )

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One KMS call; a refused blob is IntegrityError, any other failure KmsError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, operation)(**params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = error.get("Code", "error"), error.get("Message") or ""
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise IntegrityError(
                    f"AWS KMS refused the wrapped data key ({code}): another context, "
                    "another key's blob, or a tampered blob"
                ) from None
            raise KmsError(f"AWS KMS {operation} failed: {code} {message}".rstrip()) from exc
        except BotoCoreError as exc:
            raise KmsError(f"AWS KMS {operation} failed: {exc}") from exc

    def _wrapped(self, response: dict[str, Any], material: str) -> WrappedKey:
        arn = response["KeyId"]
        return WrappedKey(self.name, arn, response.get(material) or arn, response["CiphertextBlob"])

    def _key(self) -> dict[str, Any]:
        return self._call("describe_key", KeyId=self.key_id)["KeyMetadata"]

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytes, WrappedKey]:
        response = self._call(
            "generate_data_key", KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=dict(context)
        )
        return response["Plaintext"], self._wrapped(response, "KeyMaterialId")

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        _check_provider(wrapped, self.name)
        response = self._call(
            "decrypt", CiphertextBlob=wrapped.blob, EncryptionContext=dict(context), KeyId=self.key_id
        )
        return response["Plaintext"]

    def rewrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> WrappedKey:
        _check_provider(wrapped, self.name)
        if wrapped.version == self.current_version():
            return wrapped
        response = self._call(
            "re_encrypt",
            CiphertextBlob=wrapped.blob,
            SourceEncryptionContext=dict(context),
            SourceKeyId=self.key_id,
            DestinationKeyId=self.key_id,
            DestinationEncryptionContext=dict(context),
        )
        return self._wrapped(response, "DestinationKeyMaterialId")

    def rotate(self) -> str:
        self._call("rotate_key_on_demand", KeyId=self._key()["Arn"])
        return self.current_version()

    def current_version(self) -> str:
        key = self._key()
        return key.get("CurrentKeyMaterialId") or key["Arn"]

    def _rotations(self, arn: str) -> list[dict[str, Any]]:
        rotations: list[dict[str, Any]] = []
        params: dict[str, Any] = {"KeyId": arn, "IncludeKeyMaterial": "ALL_KEY_MATERIAL"}
        while True:
            page = self._call("list_key_rotations", **params)
            rotations += page.get("Rotations", [])
            if not page.get("Truncated"):
                return rotations
            params["Marker"] = page["NextMarker"]

    def describe(self) -> dict[str, Any]:
        key = self._key()
        try:
            rotations = self._rotations(key["Arn"])
        except KmsError:  # keys KMS does not rotate (imported, asymmetric, ...): none to list
            rotations = []
        versions = [
            {
                "version": rotation.get("KeyMaterialId") or "-",
                "state": rotation.get("KeyMaterialState", "rotated").lower(),
                "created": _iso(rotation["RotationDate"]) if rotation.get("RotationDate") else "-",
                "type": rotation.get("RotationType", "-").lower(),
            }
            for rotation in rotations
        ]
        return {
            "provider": self.name,
            "key_id": key["Arn"],
            "current": key.get("CurrentKeyMaterialId") or key["Arn"],
            "versions": versions,
        }


def make_key_provider(settings: Settings) -> KeyProvider:
    """The provider `settings.kms` names (`local`: the keyring, default `$home/keyring.json`)."""
    config = settings.kms
    if config.provider == "local":
        return LocalKeyring(Path(config.keyring) if config.keyring else Path(settings.home) / "keyring.json")
    if not config.key_id:
        raise KmsError("kms.key_id is required with provider aws-kms")
    access, secret = reveal(config.access_key_id), reveal(config.secret_access_key)
    if (access is None) != (secret is None):
        raise KmsError("set kms.access_key_id and kms.secret_access_key together, or neither")
    credentials = (access, secret) if access is not None and secret is not None else None
    return AwsKms(config.key_id, config.region, config.endpoint_url, credentials)
