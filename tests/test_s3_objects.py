"""The S3 object store (store/s3_objects.py) against a real S3 server (SeaweedFS, `s3_server`):
what the backend-independent tests in test_objects.py cannot see: the requests made (server-side
metadata copies, multipart uploads, pages), presigned URLs, credentials, buckets and prefixes."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError, SSLError

from budrt.config import S3Config, Settings
from budrt.security import certs
from budrt.store.s3_objects import S3ObjectStore
from tests.procs import S3Server, TcpRelay

BUCKET = "budrt-s3-objects"


def fresh(server: S3Server, **changes: Any) -> S3ObjectStore:
    """A store on a fresh prefix of the shared bucket (or on what `changes` says)."""
    config = server.config(BUCKET, prefix=f"t-{uuid.uuid4().hex[:12]}")
    page_size = changes.pop("page_size", 1000)
    return S3ObjectStore(S3Config(**{**config.model_dump(), **changes}), page_size=page_size)


def record_calls(store: S3ObjectStore) -> list[str]:
    """The S3 operations the store's client makes from now on, in order."""
    calls: list[str] = []

    def on_call(model: Any, **kwargs: Any) -> None:
        calls.append(model.name)

    store.client.meta.events.register("before-call.s3", on_call)
    return calls


def test_round_trip(s3_server: S3Server) -> None:
    store = fresh(s3_server)
    before = time.time()
    store.put("images/a.png", b"\x89PNG", "image/png", {"owner": "team-1"})
    head = store.head("images/a.png")
    got = store.get("images/a.png")
    assert head is not None and got is not None
    assert (head.key, head.size, head.content_type, dict(head.metadata)) == (
        "images/a.png",
        4,
        "image/png",
        {"owner": "team-1"},
    )
    assert (got.data, got.size, got.content_type, dict(got.metadata)) == (
        b"\x89PNG",
        4,
        "image/png",
        {"owner": "team-1"},
    )
    assert before - 2 <= head.modified <= time.time() + 1  # S3 keeps whole seconds
    assert store.get("images/b.png") is None and store.open("images/b.png") is None
    assert store.head("images/b.png") is None and store.delete("images/b.png") is False


def test_set_metadata_is_a_server_side_copy(s3_server: S3Server) -> None:
    store = fresh(s3_server)
    data = os.urandom(1 << 20)
    store.put("m/blob", data, "application/x-thing", {"a": "1", "b": "2"})
    calls = record_calls(store)
    assert store.set_metadata("m/blob", {"c": "3"}) is True
    assert calls == ["HeadObject", "CopyObject"]  # no GetObject: the bytes never came here
    head = store.head("m/blob")
    assert head is not None and dict(head.metadata) == {"c": "3"}
    assert head.content_type == "application/x-thing" and head.size == len(data)
    got = store.get("m/blob")
    assert got is not None and got.data == data


def test_put_file_multipart_and_open_streams(s3_server: S3Server, tmp_path: Path) -> None:
    store = fresh(s3_server)
    source = tmp_path / "weights.bin"
    with source.open("wb") as f:
        for _ in range(20):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    calls = record_calls(store)
    store.put_file("models/w.bin", source, "application/octet-stream", {"sha256": digest})
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") == 3  # 8+8+4 MiB
    assert "PutObject" not in calls
    head = store.head("models/w.bin")
    assert head is not None and head.size == 20 << 20 and dict(head.metadata) == {"sha256": digest}
    stream = store.open("models/w.bin")
    assert stream is not None
    h = hashlib.sha256()
    with stream:
        while chunk := stream.read(1 << 20):
            assert len(chunk) <= 1 << 20
            h.update(chunk)
    assert h.hexdigest() == digest
    early = store.open("models/w.bin")  # closing before the end is fine too
    assert early is not None
    with early:
        assert len(early.read(1000)) == 1000


def test_list_pages_and_prefixes(s3_server: S3Server) -> None:
    store = fresh(s3_server, page_size=3)
    keys = [f"images/{i:02d}.png" for i in range(10)] + ["images/a/deep.png", "other/x.png", "top.png"]
    for key in reversed(keys):
        store.put(key, key.encode(), "image/png")
    calls = record_calls(store)
    listed = store.list("")
    assert [i.key for i in listed] == sorted(keys)
    assert calls == ["ListObjectsV2"] * 5  # 13 keys, 3 a page
    assert [i.key for i in store.list("images/0")] == [f"images/0{i}" + ".png" for i in range(10)]
    assert [i.key for i in store.list("images/a")] == ["images/a/deep.png"]
    assert [i.key for i in store.list("other/")] == ["other/x.png"]
    assert store.list("nothing/") == []
    info = next(i for i in listed if i.key == "top.png")
    assert info.size == len(b"top.png") and info.modified > 0


def test_presigned_urls(s3_server: S3Server) -> None:
    store = fresh(s3_server)
    store.put("p/a.txt", b"hello", "text/plain")
    store.put("p/b.txt", b"other", "text/plain")
    url = store.presign("p/a.txt", 60)
    assert url is not None
    ok = httpx.get(url)
    assert ok.status_code == 200 and ok.content == b"hello" and ok.headers["content-type"] == "text/plain"
    assert httpx.get(url.replace("/p/a.txt?", "/p/b.txt?")).status_code == 403  # another key
    start = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    flipped = "0" if url[start] != "0" else "1"
    assert httpx.get(url[:start] + flipped + url[start + 1 :]).status_code == 403
    unsigned = url.split("?")[0]
    assert httpx.get(unsigned).status_code == 403
    short = store.presign("p/a.txt", 1)
    assert short is not None
    time.sleep(2.1)
    assert httpx.get(short).status_code == 403  # expired
    for bad in (0, -1, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError):
            store.presign("p/a.txt", bad)


def test_wrong_credentials_raise(s3_server: S3Server) -> None:
    store = fresh(s3_server)
    store.put("k", b"x", "text/plain")
    wrong_secret = fresh(s3_server, prefix=store.prefix, create_bucket=False, secret_access_key="wrong")
    for call in (
        lambda: wrong_secret.get("k"),
        lambda: wrong_secret.head("k"),
        lambda: wrong_secret.open("k"),
        lambda: wrong_secret.put("k", b"y", "text/plain"),
        lambda: wrong_secret.delete("k"),
        lambda: wrong_secret.list(""),
    ):
        with pytest.raises(ClientError):  # never None/False: an absent object is not a denied one
            call()
    with pytest.raises(ClientError):
        fresh(s3_server, access_key_id="nobody")  # create_bucket checks the bucket at construction
    got = store.get("k")
    assert got is not None and got.data == b"x"


def test_buckets_are_created_or_missing(s3_server: S3Server) -> None:
    name = f"budrt-new-{uuid.uuid4().hex[:8]}"
    config = s3_server.config(name)
    missing = S3ObjectStore(config.model_copy(update={"create_bucket": False}))
    with pytest.raises(ClientError, match="NoSuchBucket"):
        missing.put("k", b"x", "text/plain")
    with pytest.raises(ClientError, match="NoSuchBucket"):
        missing.get("k")  # a missing bucket is an error, not a missing object
    created = S3ObjectStore(config)
    created.put("k", b"x", "text/plain")
    again = S3ObjectStore(config)  # the bucket is there now: kept as it is
    assert [i.key for i in again.list("")] == ["k"]


def test_the_prefix_keeps_stores_apart(s3_server: S3Server) -> None:
    base = f"p-{uuid.uuid4().hex[:8]}"
    one = fresh(s3_server, prefix=base)
    two = fresh(s3_server, prefix=base + "x")  # a string prefix of the other's would leak
    whole = fresh(s3_server, prefix="")  # the bucket itself
    assert one.prefix == base + "/" and fresh(s3_server, prefix=f"/{base}/").prefix == base + "/"
    one.put("a/k.txt", b"1", "text/plain")
    two.put("a/k.txt", b"2", "text/plain")
    assert [i.key for i in one.list("")] == ["a/k.txt"]
    assert [i.key for i in two.list("")] == ["a/k.txt"]
    got = one.get("a/k.txt")
    assert got is not None and got.data == b"1"
    assert {i.key for i in whole.list(base)} == {f"{base}/a/k.txt", f"{base}x/a/k.txt"}
    assert one.delete("a/k.txt") and two.get("a/k.txt") is not None
    with pytest.raises(ValueError):
        fresh(s3_server, prefix="../up")


def keyed_calls(store: S3ObjectStore, key: str, source: Path) -> list[Callable[[], object]]:
    """Every method that takes a key, called with `key`."""
    return [
        lambda: store.put(key, b"x", "text/plain"),
        lambda: store.put_file(key, source, "text/plain"),
        lambda: store.get(key),
        lambda: store.open(key),
        lambda: store.head(key),
        lambda: store.set_metadata(key, {}),
        lambda: store.delete(key),
        lambda: store.presign(key, 60),
    ]


def test_invalid_keys_raise_before_any_request(s3_server: S3Server, tmp_path: Path) -> None:
    store = fresh(s3_server)
    calls = record_calls(store)
    source = tmp_path / "f"
    source.write_bytes(b"x")
    too_long = "/".join(["y" * 200] * 5) + "/" + "z" * 19  # 1024: valid, but not under the prefix
    for key in ("", "/abs", "a/../b", "a//b", ".hidden", "a b", "x" * 1025, too_long):
        for call in keyed_calls(store, key, source):
            with pytest.raises(ValueError):
                call()
    for bad_metadata in ({"Bad Name": "x"}, {"a": "\n"}):
        with pytest.raises(ValueError):
            store.put("ok", b"x", "text/plain", bad_metadata)
        with pytest.raises(ValueError):
            store.set_metadata("ok", bad_metadata)
    with pytest.raises(ValueError):
        store.list("../")
    assert calls == []


def test_https_endpoint_checked_against_the_ca_bundle(s3_server: S3Server, tmp_path: Path) -> None:
    """S3 over HTTPS (a TLS front with the platform's certificate): `ca_bundle` trusts it, a
    bundle without its CA or the system's roots refuse it, and presigned URLs are https too."""
    paths = certs.init(Settings(home=tmp_path).tls, tmp_path)
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    front = TcpRelay(port, certs.server_context(paths, require_client_cert=False)).start()
    try:
        https = f"https://127.0.0.1:{front.port}"
        store = fresh(s3_server, endpoint_url=https, ca_bundle=paths.ca)
        store.put("k", b"over tls", "text/plain")
        got = store.get("k")
        assert got is not None and got.data == b"over tls"
        url = store.presign("k", 60)
        assert url is not None and url.startswith(https)
        verify = certs.client_context(paths, with_client_cert=False)
        assert httpx.get(url, verify=verify, timeout=10).content == b"over tls"
        other = certs.init(Settings(home=tmp_path / "other").tls, tmp_path / "other")
        for bundle in (other.ca, None):  # another CA; boto3's default roots
            with pytest.raises(SSLError):
                fresh(s3_server, endpoint_url=https, ca_bundle=bundle, prefix=store.prefix).get("k")
    finally:
        front.stop()
