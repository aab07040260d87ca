"""`S3ObjectStore`: the `ObjectStore` of store/objects.py on an S3-compatible service (AWS S3,
SeaweedFS, MinIO, Ceph RGW), through one boto3 client.

Why boto3 in a thread rather than an asyncio client: every `ObjectStore` method blocks (the local
backend does file I/O, and a model push streams gigabytes), so async callers already run them with
`asyncio.to_thread`. A boto3 client is thread-safe, keeps a pool of keep-alive connections, and
brings SigV4, retries and managed multipart transfers; bench/object_store.py measures it against
aiobotocore on the same workload.

Every key is checked with `check_key` before any request and stored as `<prefix>/<key>` in
`bucket` (`config.prefix`: several platforms can share a bucket; the two together at most 1024
characters, S3's limit); `list` strips the prefix back off. A missing object reads as None/False
(a HEAD's 404 has no body, so `head` of a key in a missing bucket reads as None too); every other
error (credentials, a missing bucket, the network after the retries) propagates as botocore's
exception. `set_metadata` copies the object onto itself server-side, so its bytes never travel.
`presign` gives SigV4 query-string URLs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from budrt.config import S3Config, reveal
from budrt.store.objects import (
    DEFAULT_TYPE,
    MAX_KEY_LEN,
    ObjectHead,
    ObjectInfo,
    StoredObject,
    check_key,
    check_metadata,
)

MiB = 1 << 20
# Uploads above this go multipart, in parts of this size, several at once (managed transfer).
TRANSFER = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)
# CopyObject takes at most 5 GiB; a larger object's metadata is replaced by a multipart copy
# (UploadPartCopy: still server-side).
MAX_COPY_OBJECT = 5 << 30
COPY_TRANSFER = TransferConfig(multipart_threshold=MAX_COPY_OBJECT, multipart_chunksize=512 * MiB)
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's limit
_MISSING = {"NoSuchKey", "NotFound", "404"}  # a HEAD's error has no body: only its status
_NO_BUCKET = {"NoSuchBucket", "NotFound", "404"}


def make_client(config: S3Config) -> Any:
    """A boto3 S3 client for `config`: SigV4, standard retries, bounded timeouts, path-style
    addressing for an explicit endpoint (SeaweedFS, MinIO: no wildcard DNS for buckets)."""
    boto_config = Config(
        signature_version="s3v4",
        region_name=config.region,
        s3={"addressing_style": "path" if config.endpoint_url else "auto"},
        retries={"mode": "standard", "max_attempts": 4},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=32,  # asyncio.to_thread's default pool has up to 32 threads
    )
    session = boto3.session.Session(
        aws_access_key_id=reveal(config.access_key_id),
        aws_secret_access_key=reveal(config.secret_access_key),
        region_name=config.region,
    )
    return session.client(
        "s3",
        endpoint_url=config.endpoint_url,
        verify=str(config.ca_bundle) if config.ca_bundle is not None else None,
        config=boto_config,
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_missing(exc: ClientError) -> bool:
    return _error_code(exc) in _MISSING


def _normalize_prefix(prefix: str) -> str:
    """`""` or `<prefix>/`: a prefix is a directory, so `a` never sees the objects of `ab`."""
    prefix = prefix.strip("/")
    return f"{check_key(prefix)}/" if prefix else ""


class S3ObjectStore:
    """Objects in `config.bucket` under `config.prefix` (see the module's docstring)."""

    def __init__(self, config: S3Config, page_size: int = 1000) -> None:
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be within 1..1000 (S3's most keys a page)")
        self.bucket = config.bucket
        self.prefix = _normalize_prefix(config.prefix)
        self.page_size = page_size  # keys per ListObjectsV2 request (at most 1000)
        self.client = make_client(config)
        if config.create_bucket:
            self._ensure_bucket(config.region)

    def _ensure_bucket(self, region: str) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NO_BUCKET:
                raise
        args: dict[str, Any] = {"Bucket": self.bucket}
        if region != "us-east-1":  # AWS's default region takes no location constraint
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**args)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":  # created meanwhile, by us: fine
                raise

    def _key(self, key: str) -> str:
        full = self.prefix + check_key(key)
        if len(full) > MAX_KEY_LEN:  # S3's limit counts the prefix too
            raise ValueError(f"object key {key[:80]!r}... is too long under prefix {self.prefix!r}")
        return full

    def put(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        self.client.put_object(
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            ContentType=content_type,
            Metadata=check_metadata(metadata),
        )

    def put_file(
        self, key: str, source: Path, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Streams `source`, multipart above 8 MiB: the object appears whole when the last part is in."""
        extra = {"ContentType": content_type, "Metadata": check_metadata(metadata)}
        self.client.upload_file(str(source), self.bucket, self._key(key), ExtraArgs=extra, Config=TRANSFER)

    def _get_object(self, key: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.client.get_object(Bucket=self.bucket, Key=self._key(key)))
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise

    def get(self, key: str) -> StoredObject | None:
        response = self._get_object(key)
        if response is None:
            return None
        with response["Body"] as body:
            data = body.read()
        return StoredObject(
            data,
            response.get("ContentType") or DEFAULT_TYPE,
            len(data),
            response["LastModified"].timestamp(),
            dict(response.get("Metadata") or {}),
        )

    def open(self, key: str) -> BinaryIO | None:
        """botocore's StreamingBody (an `io.IOBase`: `read`, `close`, `with`); a short body raises
        at its end rather than reading as a whole object."""
        response = self._get_object(key)
        return None if response is None else cast(BinaryIO, response["Body"])

    def head(self, key: str) -> ObjectHead | None:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        return ObjectHead(
            key,
            int(response["ContentLength"]),
            response["LastModified"].timestamp(),
            response.get("ContentType") or DEFAULT_TYPE,
            dict(response.get("Metadata") or {}),
        )

    def set_metadata(self, key: str, metadata: Mapping[str, str]) -> bool:
        """A server-side copy onto itself with the new metadata and the same content type."""
        checked = check_metadata(metadata)
        head = self.head(key)
        if head is None:
            return False
        full = self._key(key)
        source = {"Bucket": self.bucket, "Key": full}
        args = {"MetadataDirective": "REPLACE", "ContentType": head.content_type, "Metadata": checked}
        try:
            if head.size <= MAX_COPY_OBJECT:
                self.client.copy_object(Bucket=self.bucket, Key=full, CopySource=source, **args)
            else:
                self.client.copy(source, self.bucket, full, ExtraArgs=args, Config=COPY_TRANSFER)
        except ClientError as exc:
            if _is_missing(exc):  # deleted since the head
                return False
            raise
        return True

    def delete(self, key: str) -> bool:
        """Whether the object existed (S3's DeleteObject answers the same either way: head first)."""
        if self.head(key) is None:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        directory = prefix.rpartition("/")[0]
        if directory:
            check_key(directory)  # as the local store: "../" is no prefix of any key
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket,
            Prefix=self.prefix + prefix,
            PaginationConfig={"PageSize": self.page_size},
        )
        skip = len(self.prefix)
        found = [
            ObjectInfo(item["Key"][skip:], int(item["Size"]), item["LastModified"].timestamp())
            for page in pages
            for item in page.get("Contents", ())
            if not item["Key"].endswith("/")  # a "directory" marker some servers list
        ]
        return sorted(found, key=lambda info: info.key)

    def presign(self, key: str, expires_s: int) -> str | None:
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be within 1..{MAX_PRESIGN_S}")
        return cast(
            str,
            self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
            ),
        )
