"""Sending upstream responses to the client: whole (`Buffered`), or an SSE stream relayed
chunk by chunk as received (`UpstreamStream`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from starlette.types import Receive, Scope, Send

from budrt.gateway.metrics import CLIENT_DISCONNECTS, UPSTREAM_ERRORS, RequestTracker
from budrt.gateway.routing import Endpoint, cancelled_for_hang
from budrt.gateway.usage import STREAM_TAIL_BYTES, record_usage
from budrt.protocol.errors import APIError

log = logging.getLogger("budrt.gateway.proxy")

_DROP_HEADERS = frozenset(
    {
        # Hop-by-hop (RFC 9110 7.6.1): about the upstream connection, not the content.
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        # Recomputed for the client's connection, or the gateway's own.
        "content-length",
        "content-encoding",
        "date",
        "server",
        # One origin serves every caller and upstream: no upstream may set cookies or
        # alternative services on it.
        "set-cookie",
        "set-cookie2",
        "alt-svc",
    }
)
_DROP_RAW = frozenset(name.encode() for name in _DROP_HEADERS)
_CONNECTION = b"connection"

RawHeaders = list[tuple[bytes, bytes]]


def pass_headers(resp: aiohttp.ClientResponse) -> RawHeaders:
    """The upstream's response headers to relay, as ASGI wants them (lower-case names, bytes),
    from the raw header list: no decoding to str and back, and repeated headers survive.
    aiohttp bounds their number and size (128 headers of at most 8 KiB)."""
    out = []
    listed: set[bytes] | None = None  # more hop-by-hop headers, named by Connection
    for name, value in resp.raw_headers:
        name = name.lower()
        if name not in _DROP_RAW:
            out.append((name, value))
        elif name == _CONNECTION:
            listed = (listed or set()) | {t.strip().lower() for t in value.split(b",")}
    if listed:
        out = [h for h in out if h[0] not in listed]
    return out


_NAMES: dict[str, bytes] = {}  # header names the gateway adds, encoded once


def encode_headers(headers: dict[str, str]) -> RawHeaders:
    """The gateway's own headers (rate limits, cache) for a raw header list."""
    out = []
    for name, value in headers.items():
        raw = _NAMES.get(name)
        if raw is None:
            raw = name.lower().encode("latin-1")
            if len(_NAMES) < 1024:
                _NAMES[name] = raw
        out.append((raw, value.encode("latin-1")))
    return out


class UpstreamStream:
    """An ASGI response relaying an upstream SSE stream as it arrives, whole events at a time."""

    def __init__(
        self,
        model: str,
        ep: Endpoint,
        resp: aiohttp.ClientResponse,
        first: bytes,
        extra_headers: RawHeaders,
        disconnected: asyncio.Future[None],
        tracker: RequestTracker,
    ) -> None:
        self.model = model
        self.ep = ep
        self.resp = resp
        self.first = first
        self.status_code = resp.status
        self.raw_headers = pass_headers(resp)
        if extra_headers:
            _merge(self.raw_headers, extra_headers)
        self.disconnected = disconnected
        self.tracker = tracker
        # Set by the caller before serving: `capture` > 0 keeps the whole stream (up to that
        # many bytes) in `captured` for the cache; `on_end` runs once the stream is over.
        self.capture = 0
        self.captured: bytearray | None = None
        self.tail = bytearray()
        self.completed = False  # the upstream ended the stream cleanly and the client got it all
        self.on_end: Callable[[UpstreamStream], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        self.ep.waiters.add(pump)  # a hang found by the health check ends the stream (in-band)
        try:
            await asyncio.wait((pump, self.disconnected), return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                CLIENT_DISCONNECTS.labels(self.model).inc()
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            else:
                pump.result()  # re-raise anything unexpected (after headers: uvicorn drops it)
        finally:
            self.ep.waiters.discard(pump)
            pump.cancel()
            self.disconnected.cancel()
            self.resp.close()  # drops the upstream connection if the stream did not finish
            self.ep.outstanding -= 1
            self.tracker.done(self.status_code, time.monotonic())
            if self.on_end is not None:
                await self.on_end(self)

    async def _forward(self, send: Send, data: bytearray) -> bool:
        """Relay `data` to the client (False: it has gone), keeping its tail and, for the cache,
        the whole stream."""
        try:
            await send({"type": "http.response.body", "body": bytes(data), "more_body": True})
        except OSError:
            return False
        self.tail += data
        if len(self.tail) > 2 * STREAM_TAIL_BYTES:
            del self.tail[:-STREAM_TAIL_BYTES]
        if self.captured is not None:
            self.captured += data
            if len(self.captured) > self.capture:
                self.captured = None  # too big to cache
        return True

    async def _pump(self, send: Send) -> None:
        self.captured = bytearray() if self.capture else None
        # Relayed up to the last event boundary: an upstream that dies inside an event must not
        # leave half of it before the error event (the client would read one corrupt line).
        pending = bytearray(self.first)
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            chunks = self.resp.content.iter_any()
            while True:
                cut = _events_end(pending)
                if cut and not await self._forward(send, pending[:cut]):
                    return  # the client went away; the caller closes the upstream response
                del pending[:cut]
                try:
                    pending += await anext(chunks)
                except StopAsyncIteration:
                    break
            if pending and not await self._forward(send, pending):  # its last bytes, as they are
                return
            self.completed = True
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Headers are sent, so no status can change; an SSE error event is what OpenAI
            # clients understand (they raise on an event carrying "error").
            UPSTREAM_ERRORS.labels(self.model, "stream_broken").inc()
            fields = {"url": self.ep.base_url, "error": repr(exc)}
            log.warning("upstream stream broke", extra={"fields": fields})
            error = APIError(502, "The model server closed the stream unexpectedly.", code="upstream_error")
            await _send_quietly(send, b"data: " + orjson.dumps(error.body()) + b"\n\n")
        except asyncio.CancelledError:
            if not cancelled_for_hang():
                raise  # the client left
            # The health check found the model server hung: end the stream now, not at the read
            # timeout, with an error event and the usual terminator.
            UPSTREAM_ERRORS.labels(self.model, "hung").inc()
            log.warning("upstream stopped answering mid-stream", extra={"fields": {"url": self.ep.base_url}})
            error = APIError(502, "The model server stopped answering.", code="upstream_unresponsive")
            await _send_quietly(send, b"data: " + orjson.dumps(error.body()) + b"\n\ndata: [DONE]\n\n")
        record_usage(self.model, self.tail)
        await _send_quietly(send, b"", more_body=False)


def _events_end(data: bytearray) -> int:
    """Where the last complete SSE event in `data` ends (an event ends with a blank line, LF or
    CRLF); 0 when none has yet."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


async def _send_quietly(send: Send, body: bytes, more_body: bool = True) -> None:
    try:
        await send({"type": "http.response.body", "body": body, "more_body": more_body})
    except OSError:
        pass


def _merge(headers: RawHeaders, extra: RawHeaders) -> None:
    """Add `extra` to `headers`, replacing headers of the same name (the gateway's win)."""
    names = {name for name, _ in extra}
    if any(name in names for name, _ in headers):
        headers[:] = [h for h in headers if h[0] not in names]
    headers += extra


class Buffered:
    """A whole response (an upstream's, a cached one, or a 499 marker) sent as two ASGI
    messages: cheaper than a Starlette `Response`, and it keeps the upstream's raw headers."""

    __slots__ = ("status_code", "body", "raw_headers", "usage", "after")

    def __init__(
        self, status_code: int, body: bytes, raw_headers: RawHeaders, extra: RawHeaders | None = None
    ) -> None:
        self.status_code = status_code
        self.body = body
        if extra:
            _merge(raw_headers, extra)
        if status_code >= 200 and status_code not in (204, 304):
            raw_headers.append((b"content-length", b"%d" % len(body)))
        self.raw_headers = raw_headers
        # Token usage found in the body, if someone looked already (None: not looked or none).
        self.usage: dict[str, Any] | None = None
        # Run by whoever sends this response, once it is sent (settling rate limits).
        self.after: Callable[[], Awaitable[None]] | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.raw_headers:
            if key == name:
                return value
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})
