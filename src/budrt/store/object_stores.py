"""Which object stores the platform opens: the backend the settings name, encrypted when asked.

- `make_object_store`: generated images and other platform objects; `objects.backend` (a local
  directory, default `$home/objects`, or S3), wrapped in `EncryptedObjectStore` under the key
  provider `kms` names when `objects.encrypt` (the default).
- `make_repository_store`: the model repository at `repository_url` (store/repository.py),
  encrypted the same way. Its files were written in the clear before encryption existed, so it
  reads objects without an envelope (`allow_plaintext`): their bytes are still checked against
  the sha256 they are stored under, which a planted file cannot match.

Stores that `put_file` large files (models) stage their ciphertext under `$home/tmp`, on the
same disk as the home, not in a possibly small `/tmp`.
"""

from __future__ import annotations

from pathlib import Path

from budrt.config import Settings
from budrt.security.kms import make_key_provider
from budrt.store.encrypted_objects import EncryptedObjectStore
from budrt.store.objects import LocalObjectStore, ObjectStore
from budrt.store.repository import store_for_url


def backend_store(settings: Settings) -> ObjectStore:
    """The unencrypted store `settings.objects` names."""
    config = settings.objects
    if config.backend == "s3":
        from budrt.store.s3_objects import S3ObjectStore  # boto3 is slow to import: only when used

        return S3ObjectStore(config.s3)
    return LocalObjectStore(Path(config.path) if config.path is not None else Path(settings.home) / "objects")


def _encrypted(settings: Settings, inner: ObjectStore, allow_plaintext: bool) -> ObjectStore:
    if not settings.objects.encrypt:
        return inner
    temp_dir = Path(settings.home) / "tmp"
    provider = make_key_provider(settings)
    return EncryptedObjectStore(inner, provider, allow_plaintext=allow_plaintext, temp_dir=temp_dir)


def make_object_store(settings: Settings) -> ObjectStore:
    return _encrypted(settings, backend_store(settings), allow_plaintext=False)


def repository_url(settings: Settings) -> str:
    return settings.repository_url or f"file://{Path(settings.home) / 'repository'}"


def make_repository_store(settings: Settings) -> ObjectStore:
    return _encrypted(settings, store_for_url(repository_url(settings), settings), allow_plaintext=True)
