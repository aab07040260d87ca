"""Generated images handed out as URLs: stored by the gateway, served by signed, expiring links.

A non-streaming `POST /v1/images/generations` that asks for `response_format` "url" (or for
nothing: OpenAI's default) is sent upstream asking for "b64_json". Each image of a 200 answer is
stored as `images/<random id>.<ext>` in the object store and its `b64_json` replaced by
`<base>/v1/images/files/<id>.<ext>?expires=<unix>&sig=<HMAC>`; every other field is kept.

`GET /v1/images/files/{name}` needs no API key: the signature (security/signed_urls.py), over the
path and the expiry, is the credential. 403 for a missing, malformed, expired or foreign
signature; 404 for a bad name or an image already deleted. Images are deleted `retention_s`
after they were stored, whatever their URLs say.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import re
import secrets
import time
from typing import Any

import orjson
from python_multipart import parse_form
from starlette.requests import Request
from starlette.responses import Response

from budrt.config import GatewayConfig
from budrt.gateway.stream import Buffered, UpstreamStream
from budrt.protocol.errors import APIError, invalid_request
from budrt.security.signed_urls import sign, verify
from budrt.store.objects import ObjectStore

log = logging.getLogger("budrt.gateway.images")

FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FILES_PATH = "/v1/images/files/"
PREFIX = "images/"  # object keys of generated images
FILE_NAME = re.compile(r"[A-Za-z0-9_-]{8,64}\.(png|jpeg|webp)")
_EXPIRES = re.compile(r"[0-9]{1,12}")
MAX_SWEEP_INTERVAL_S = 300.0


def form_fields(body: bytes, content_type: str) -> dict[str, Any]:
    """The text fields of a multipart image edit (its files skipped), typed as JSON would carry
    them where the gateway reads them: `n` an int, `stream` a bool; 400 if it is no form."""
    if not content_type.startswith("multipart/form-data"):
        raise invalid_request("Send an image edit as multipart/form-data, as the OpenAI SDK does.")
    fields: dict[str, Any] = {}

    def on_field(field: Any) -> None:
        name = field.field_name.decode("utf-8", "replace")
        fields.setdefault(name, (field.value or b"").decode("utf-8", "replace"))

    try:
        parse_form(
            {"Content-Type": content_type.encode("latin-1")}, io.BytesIO(body), on_field, lambda _: None
        )
    except Exception:
        raise invalid_request("The body is not a readable multipart form.") from None
    if isinstance(fields.get("n"), str) and fields["n"].isdigit():
        fields["n"] = int(fields["n"])
    if fields.get("stream") in ("true", "false"):
        fields["stream"] = fields["stream"] == "true"
    return fields


class BadUpstreamImage(Exception):
    """A 200 from the model server that holds no usable image answer."""


def ask_for_b64(data: dict[str, Any], stream: bool) -> bool:
    """Switch a request that wants URLs (`response_format` "url" or none, not streamed) to
    "b64_json", which every model server can answer; True when it did (the answer then needs
    `ImageFiles.to_urls`). A stream, or any other format, is left to the upstream."""
    if stream or data.get("response_format", "url") not in ("url", None):
        return False
    data["response_format"] = "b64_json"
    return True


def _extension(replied: Any, requested: Any) -> str:
    """The stored images' format: the answer's `output_format`, else the request's, else png."""
    if replied is not None:
        if not isinstance(replied, str) or replied not in FORMATS:
            raise BadUpstreamImage("unknown output_format")
        return replied
    return requested if isinstance(requested, str) and requested in FORMATS else "png"


def _decode(text: str) -> bytes:
    try:
        image = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadUpstreamImage("b64_json is not base64") from None
    if not image:
        raise BadUpstreamImage("an empty image")
    return image


def _with_url(item: dict[str, Any], url: str) -> dict[str, Any]:
    """`item` with `url` in place of its `b64_json` (the other fields, in order, kept)."""
    return {("url" if k == "b64_json" else k): (url if k == "b64_json" else v) for k, v in item.items()}


class ImageFiles:
    """Stores generated images, writes their URLs, serves them, and deletes old ones."""

    def __init__(self, store: ObjectStore, config: GatewayConfig, key: bytes) -> None:
        self.store = store
        self.config = config.images
        self.public_url = config.public_url
        self.key = key

    def url(self, base: str, name: str, now: float) -> str:
        """The link to image `name`: the store's presigned URL or the gateway's signed one."""
        if self.config.links == "store":
            presigned = self.store.presign(PREFIX + name, self.config.url_ttl_s)
            if presigned is None:
                raise RuntimeError("the object store gives no presigned URLs")
            return presigned
        expires = int(now) + self.config.url_ttl_s
        path = FILES_PATH + name
        return f"{base}{path}?expires={expires}&sig={sign(path, expires, self.key)}"

    async def to_urls(
        self, result: Buffered | UpstreamStream, request: Request, data: dict[str, Any]
    ) -> Buffered | UpstreamStream:
        """`result` with its images stored and replaced by URLs (a 200 `Buffered` only); a
        clean 502/500 error when that fails. The rate-limit settling (`after`) and the usage
        found in the answer stay with the response sent."""
        if not isinstance(result, Buffered) or result.status_code != 200:
            return result
        base = self.public_url or str(request.base_url).rstrip("/")
        headers = [h for h in result.raw_headers if h[0] != b"content-length"]  # Buffered adds it
        try:
            body = await asyncio.to_thread(self._rewrite, result.body, base, data.get("output_format"))
        except asyncio.CancelledError:
            if result.after is not None:  # nobody will send this response: settle now
                await result.after()
            raise
        except BadUpstreamImage as exc:
            log.warning("unusable image answer from upstream", extra={"fields": {"error": str(exc)}})
            error = APIError(502, "The model server returned an unusable image.", code="upstream_error")
        except Exception as exc:  # e.g. the disk is full
            log.error("storing generated images failed", exc_info=exc)
            error = APIError(500, "The generated images could not be stored.", code="image_store_failed")
        else:
            out = Buffered(200, body, headers)
            out.usage = result.usage
            out.after = result.after
            return out
        out = Buffered(error.status, orjson.dumps(error.body()), headers)
        out.after = result.after
        return out

    def _rewrite(self, body: bytes, base: str, requested: Any) -> bytes:
        """The answer with each `b64_json` image stored and replaced by its URL (blocking)."""
        try:
            reply = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadUpstreamImage("not JSON") from None
        items = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(items, list):
            raise BadUpstreamImage("no `data` list")
        ext = _extension(reply.get("output_format"), requested)
        now, stored = time.time(), []
        try:
            for i, item in enumerate(items):
                if not isinstance(item, dict) or not isinstance(item.get("b64_json"), str):
                    continue  # nothing to store (e.g. an upstream that sent a URL of its own)
                image = _decode(item["b64_json"])
                name = f"{secrets.token_urlsafe(16)}.{ext}"
                self.store.put(PREFIX + name, image, FORMATS[ext])
                stored.append(PREFIX + name)
                items[i] = _with_url(item, self.url(base, name, now))
        except BaseException:
            for key in stored:  # no URL reaches the client: do not keep them until retention
                try:
                    self.store.delete(key)
                except OSError:
                    pass
            raise
        return orjson.dumps(reply)

    async def serve(self, request: Request) -> Response:
        """`GET /v1/images/files/{name}`: the image, if the URL's signature holds."""
        name = request.path_params["name"]
        if FILE_NAME.fullmatch(name) is None:
            raise APIError(404, "No such image.", code="image_not_found")
        expires_text = request.query_params.get("expires", "")
        signature = request.query_params.get("sig", "")
        now = time.time()
        expires = int(expires_text) if _EXPIRES.fullmatch(expires_text) else 0
        if not verify(FILES_PATH + name, expires, signature, self.key, now):
            raise APIError(403, "This image URL is invalid or has expired.", code="invalid_signature")
        stored = await asyncio.to_thread(self.store.get, PREFIX + name)
        if stored is None:  # deleted by retention
            raise APIError(404, "This image no longer exists.", code="image_not_found")
        headers = {
            "Cache-Control": f"private, max-age={max(0, int(expires - now))}",
            "X-Content-Type-Options": "nosniff",
        }
        return Response(stored.data, media_type=stored.content_type, headers=headers)

    def sweep(self, now: float) -> int:
        """Delete images stored more than `retention_s` before `now` (blocking); how many."""
        cutoff = now - self.config.retention_s
        deleted = 0
        for info in self.store.list(PREFIX):
            if info.modified < cutoff and self.store.delete(info.key):
                deleted += 1
        return deleted

    async def keep_retention(self) -> None:
        """Sweep now, then every tenth of `retention_s` (at most every 5 minutes), until cancelled."""
        interval = min(self.config.retention_s / 10, MAX_SWEEP_INTERVAL_S)
        while True:
            try:
                deleted = await asyncio.to_thread(self.sweep, time.time())
                if deleted:
                    log.info("deleted expired images", extra={"fields": {"count": deleted}})
            except Exception as exc:  # e.g. the store is unreachable: try again next time
                log.error("image retention sweep failed", exc_info=exc)
            await asyncio.sleep(interval)
