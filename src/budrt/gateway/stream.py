"""Relaying an upstream SSE stream to the client chunk by chunk, as received."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from starlette.types import Receive, Scope, Send

from budrt.gateway.metrics import CLIENT_DISCONNECTS, UPSTREAM_ERRORS, RequestTracker
from budrt.gateway.routing import Endpoint, cancelled_for_hang
from budrt.gateway.usage import STREAM_TAIL_BYTES, record_usage
from budrt.protocol.errors import APIError

log = logging.getLogger("budrt.gateway.proxy")

# Response headers that describe the upstream connection rather than the content.
_DROP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date", "server"}
)


def pass_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() not in _DROP_HEADERS}


class UpstreamStream:
    """An ASGI response relaying an upstream SSE stream chunk by chunk, as received."""

    def __init__(
        self,
        model: str,
        ep: Endpoint,
        resp: aiohttp.ClientResponse,
        first: bytes,
        extra_headers: dict[str, str],
        disconnected: asyncio.Future[None],
        tracker: RequestTracker,
    ) -> None:
        self.model = model
        self.ep = ep
        self.resp = resp
        self.first = first
        self.status_code = resp.status
        headers = pass_headers(resp)
        headers.update(extra_headers)
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
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

    async def _pump(self, send: Send) -> None:
        tail = self.tail
        tail += self.first
        captured = self.captured = bytearray(self.first) if self.capture else None
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            try:
                await send({"type": "http.response.body", "body": self.first, "more_body": True})
            except OSError:
                return
            async for chunk in self.resp.content.iter_any():
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:
                    return  # the client went away; the caller closes the upstream response
                tail += chunk
                if len(tail) > 2 * STREAM_TAIL_BYTES:
                    del tail[:-STREAM_TAIL_BYTES]
                if captured is not None:
                    captured += chunk
                    if len(captured) > self.capture:
                        captured = self.captured = None  # too big to cache
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
        record_usage(self.model, tail)
        await _send_quietly(send, b"", more_body=False)


async def _send_quietly(send: Send, body: bytes, more_body: bool = True) -> None:
    try:
        await send({"type": "http.response.body", "body": body, "more_body": more_body})
    except OSError:
        pass
