"""Image URLs through a real gateway (HTTP) in front of the mock upstream: the gateway stores the
images the model server sent as b64_json and answers with signed, expiring URLs that work without
an API key (gateway/images.py); retention; the usage rows of image requests."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
from sqlalchemy import select

from budrt.config import ObjectStoreConfig
from budrt.gateway.app import create_app
from budrt.gateway.images import FILES_PATH, ImageFiles
from budrt.security.signed_urls import sign, url_key
from budrt.store.db import migrate
from budrt.store.encrypted_objects import EncryptedObjectStore
from budrt.store.keys import KeyStore
from budrt.store.tables import UsageRecord
from budrt.store.usage import UsageStore
from tests.gateway.identity import Gateway, settings
from tests.mock_upstream import MOCK_STEPS, MockUpstream, ServerThread
from tests.procs import S3Server

MODEL = "painter"
IMAGES = "/v1/images/generations"


@dataclass
class Images:
    gateway: Gateway
    files: ImageFiles
    key: str

    def post(self, body: dict[str, Any]) -> httpx.Response:
        with self.gateway.client(self.key) as client:
            return client.post(IMAGES, json={"model": MODEL, "prompt": "a red circle", **body})

    def stored(self) -> list[str]:
        return [info.key for info in self.files.store.list("images/")]

    def stop(self) -> None:
        self.gateway.stop()


@dataclass
class Upstream:
    mock: MockUpstream
    url: str  # the OpenAI base URL (…/v1)

    def direct(self, body: dict[str, Any]) -> httpx.Response:
        """What the model server itself answers to `body` (the mock is deterministic)."""
        return httpx.post(self.url + "/images/generations", json={"model": MODEL, **body}, timeout=10)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    mock = MockUpstream("up")
    server = ServerThread(mock.app).start()
    yield Upstream(mock, server.url + "/v1")
    server.stop()


def _start(home: Path, upstream: Upstream, gateway: dict[str, Any] | None = None, **extra: Any) -> Images:
    s = settings(home, upstream.url, [MODEL], gateway=gateway, metering={"flush_interval_s": 0.05}, **extra)
    migrate(s.database_url_resolved)
    store = KeyStore.from_settings(s)
    app = create_app(s, key_store=store)
    g = Gateway(ServerThread(app).start(), store, s)
    key, _ = store.create("painter")
    return Images(g, app.state.gateway.images, key)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Images]:
    started = _start(tmp_path_factory.mktemp("images"), upstream)
    yield started
    started.stop()


def _fetch(url: str) -> httpx.Response:
    return httpx.get(url, timeout=10)  # no Authorization header: the signature is the credential


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _with_query(url: str, **params: str | None) -> str:
    """`url` with query parameters replaced (None removes one)."""
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update({k: v for k, v in params.items() if v is not None})
    for name in [k for k, v in params.items() if v is None]:
        query.pop(name, None)
    return parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()


def test_urls_serve_the_upstream_bytes(images: Images, upstream: Upstream) -> None:
    body = {"n": 2, "size": "16x16"}
    resp = images.post(body)
    assert resp.status_code == 200, resp.text
    assert upstream.mock.last_body["response_format"] == "b64_json"  # asked upstream for the bytes
    sent = upstream.direct({"prompt": "a red circle", "response_format": "b64_json", **body}).json()
    answer = resp.json()
    assert {k: v for k, v in answer.items() if k != "data"} == {k: v for k, v in sent.items() if k != "data"}
    assert answer["usage"]["images"] == 2  # every other field as the model server sent it
    assert [list(item) for item in answer["data"]] == [["url", "revised_prompt"]] * 2
    assert [item["revised_prompt"] for item in answer["data"]] == ["revised 0", "revised 1"]
    for item, original in zip(answer["data"], sent["data"], strict=True):
        url = item["url"]
        assert url.startswith(images.gateway.url + FILES_PATH) and urlsplit(url).path.endswith(".png")
        got = _fetch(url)
        assert got.status_code == 200, got.text
        assert got.content == base64.b64decode(original["b64_json"])
        assert got.headers["content-type"] == "image/png"
        assert got.headers["x-content-type-options"] == "nosniff"
        cache = got.headers["cache-control"]
        assert cache.startswith("private, max-age=") and 3590 <= int(cache.rpartition("=")[2]) <= 3600
    home = images.gateway.settings.home
    for path in (home / "objects", home / "objects/images"):
        assert path.stat().st_mode & 0o777 == 0o700
    for name in images.stored():
        assert (home / "objects" / name).stat().st_mode & 0o777 == 0o600


def test_an_explicit_url_format_and_other_image_formats(images: Images, upstream: Upstream) -> None:
    for fmt in ("jpeg", "webp"):
        resp = images.post({"response_format": "url", "output_format": fmt})
        assert resp.status_code == 200, resp.text
        assert upstream.mock.last_body["response_format"] == "b64_json"
        url = resp.json()["data"][0]["url"]
        assert urlsplit(url).path.endswith(f".{fmt}")
        got = _fetch(url)
        assert got.status_code == 200 and got.headers["content-type"] == f"image/{fmt}"


def test_b64_json_passes_unchanged(images: Images, upstream: Upstream) -> None:
    before = images.stored()
    body = {"prompt": "a red circle", "n": 2, "response_format": "b64_json"}
    resp = images.post(body)
    assert resp.status_code == 200
    assert resp.content == upstream.direct(body).content
    assert images.stored() == before


def test_a_stream_passes_untouched(images: Images, upstream: Upstream) -> None:
    images.post({"stream": True})
    assert "response_format" not in upstream.mock.last_body  # not turned into b64_json


def test_bad_signatures_are_refused(images: Images) -> None:
    resp = images.post({"n": 2})
    first, second = (item["url"] for item in resp.json()["data"])
    assert _fetch(first).status_code == 200
    sig = parse_qs(urlsplit(first).query)["sig"][0]
    expires = parse_qs(urlsplit(first).query)["expires"][0]
    tampered = ("A" if sig[0] != "A" else "B") + sig[1:]
    refused = [
        _with_query(first, sig=tampered),
        _with_query(first, sig=None),
        _with_query(first, expires=None),
        _with_query(first, expires=str(int(expires) + 1)),  # a longer life: not what was signed
        _with_query(first, expires="soon"),
        _with_query(first, sig="é" * 43),
        _with_query(second, sig=sig, expires=expires),  # another image's valid signature
        _with_query(first.replace(".png?", ".jpeg?"), sig=sig),  # same id, another extension
    ]
    for url in refused:
        error = _error(_fetch(url), 403)
        assert error["type"] == "permission_error" and error["code"] == "invalid_signature", url
    # A signature that has expired (signed with a past expiry by the same key).
    name = urlsplit(first).path.rpartition("/")[2]
    past = int(time.time()) - 1
    old = sign(FILES_PATH + name, past, url_key(images.gateway.settings))
    _error(_fetch(_with_query(first, expires=str(past), sig=old)), 403)
    # Names are checked first: not an image name at all is a 404.
    base = images.gateway.url + FILES_PATH
    for bad in ("short.png", "AbCdEfGh12345678.gif", "AbCdEfGh12345678.png.png", "..%2F..%2Fsecret.png"):
        assert _fetch(f"{base}{bad}?expires={expires}&sig={sig}").status_code == 404, bad
    with images.gateway.client(images.key) as client:  # an API key does not replace the signature
        assert client.get(_with_query(first, sig=None)).status_code == 403


def test_a_valid_url_of_a_missing_image_is_404(images: Images) -> None:
    name = "NeverStoredImage1234.png"
    expires = int(time.time()) + 60
    sig = sign(FILES_PATH + name, expires, url_key(images.gateway.settings))
    error = _error(_fetch(f"{images.gateway.url}{FILES_PATH}{name}?expires={expires}&sig={sig}"), 404)
    assert error["type"] == "not_found_error"


def test_urls_expire(tmp_path: Path, upstream: Upstream) -> None:
    short = _start(tmp_path, upstream, {"images": {"url_ttl_s": 1}})
    try:
        resp = short.post({})
        assert resp.status_code == 200, resp.text
        url = resp.json()["data"][0]["url"]
        time.sleep(1.2)
        _error(_fetch(url), 403)
        assert len(short.stored()) == 1  # still stored: only its URL is over
    finally:
        short.stop()


def test_public_url(tmp_path: Path, upstream: Upstream) -> None:
    public = _start(tmp_path, upstream, {"public_url": "https://images.example.com/"})
    try:
        url = public.post({}).json()["data"][0]["url"]
        assert url.startswith("https://images.example.com" + FILES_PATH)
        here = url.replace("https://images.example.com", public.gateway.url)
        assert _fetch(here).status_code == 200
    finally:
        public.stop()


def test_images_stored_encrypted_on_s3_behind_gateway_links(
    tmp_path: Path, upstream: Upstream, s3_server: S3Server
) -> None:
    objects = ObjectStoreConfig(backend="s3", s3=s3_server.config("images-sealed"))
    sealed = _start(tmp_path, upstream, objects=objects)
    try:
        resp = sealed.post({"size": "16x16"})
        assert resp.status_code == 200, resp.text
        url = resp.json()["data"][0]["url"]
        assert url.startswith(sealed.gateway.url + FILES_PATH)
        sent = upstream.direct({"prompt": "a red circle", "response_format": "b64_json", "size": "16x16"})
        picture = base64.b64decode(sent.json()["data"][0]["b64_json"])
        assert _fetch(url).content == picture
        (key,) = sealed.stored()
        assert isinstance(sealed.files.store, EncryptedObjectStore)
        in_bucket = sealed.files.store.inner.get(key)
        assert in_bucket is not None and picture not in in_bucket.data  # S3 holds ciphertext only
    finally:
        sealed.stop()


def test_store_links_are_s3_presigned_urls(tmp_path: Path, upstream: Upstream, s3_server: S3Server) -> None:
    objects = ObjectStoreConfig(backend="s3", s3=s3_server.config("images-open"), encrypt=False)
    presigned = _start(tmp_path, upstream, {"images": {"links": "store"}}, objects=objects)
    try:
        url = presigned.post({"size": "16x16"}).json()["data"][0]["url"]
        assert url.startswith(s3_server.endpoint_url + "/images-open/images/") and "X-Amz-Signature" in url
        got = _fetch(url)
        assert got.status_code == 200 and got.content.startswith(b"\x89PNG")
        assert _fetch(url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403
    finally:
        presigned.stop()
    with pytest.raises(ValueError, match="objects.encrypt false"):  # presigned ciphertext: refused
        settings(
            tmp_path,
            upstream.url,
            [MODEL],
            gateway={"images": {"links": "store"}},
            objects=objects.model_copy(update={"encrypt": True}),
        )


def test_retention_deletes_old_images(images: Images) -> None:
    url = images.post({}).json()["data"][0]["url"]
    assert _fetch(url).status_code == 200
    kept = images.stored()
    assert images.files.sweep(time.time()) == 0  # nothing is a day old yet
    assert images.files.sweep(time.time() + 86400 + 1) == len(kept)
    assert images.stored() == []
    _error(_fetch(url), 404)  # a valid signature, but the image is gone


def test_retention_runs_in_the_background(tmp_path: Path, upstream: Upstream) -> None:
    brief = _start(tmp_path, upstream, {"images": {"retention_s": 1}})  # swept every 0.1 s
    try:
        url = brief.post({}).json()["data"][0]["url"]
        deadline = time.monotonic() + 10
        while (status := _fetch(url).status_code) == 200:
            assert time.monotonic() < deadline, "never deleted"
            time.sleep(0.1)
        assert status == 404 and brief.stored() == []
    finally:
        brief.stop()


def test_an_unusable_upstream_image_is_a_clean_502(tmp_path: Path, upstream: Upstream) -> None:
    # One request at a time per key: a ticket the failure did not settle would refuse the next.
    limited = _start(tmp_path, upstream, {"ratelimit": {"key_concurrency": 1}})
    try:
        resp = limited.post({"n": 2, "mock": "bad_b64"})
        error = _error(resp, 502)
        assert error["code"] == "upstream_error" and error["type"] == "server_error"
        assert limited.stored() == []  # the first image, stored before the bad one, is gone again
        assert limited.post({}).status_code == 200  # settled; the gateway serves on
    finally:
        limited.stop()


def test_usage_rows_count_images(tmp_path: Path, upstream: Upstream) -> None:
    metered = _start(tmp_path, upstream)
    try:
        body = {"n": 3, "size": "16x8"}
        resp = metered.post(body)
        assert resp.status_code == 200
        tokens = resp.json()["usage"]["input_tokens"]
        usage = UsageStore(metered.gateway.store.db)
        deadline = time.monotonic() + 10
        while usage.count() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with usage.db.session() as session:
            row = session.scalars(select(UsageRecord)).one()
        assert (row.endpoint, row.status, row.prompt_tokens) == ("image", 200, tokens)
        assert row.completion_tokens == 0
        assert (row.images, row.pixels, row.steps) == (3, 3 * 16 * 8, 3 * MOCK_STEPS)
        with metered.gateway.client(metered.key) as client:
            report = client.get("/v1/usage").json()
        assert {k: report["totals"][k] for k in ("images", "pixels", "steps", "prompt_tokens")} == {
            "images": 3,
            "pixels": 384,
            "steps": 3 * MOCK_STEPS,
            "prompt_tokens": tokens,
        }
        assert report["data"][0]["model"] == MODEL and report["data"][0]["images"] == 3
    finally:
        metered.stop()


def test_the_rewritten_body_is_json(images: Images) -> None:
    """The body and its Content-Length agree (the upstream's length was dropped)."""
    resp = images.post({"n": 1})
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert orjson.loads(resp.content)["data"][0]["url"]
