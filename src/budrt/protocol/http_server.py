"""The HTTP/1.1 protocol every budrt server runs: uvicorn's httptools protocol with a bound on the
request head (request line and headers).

httptools keeps no such bound: it buffers a header however long it grows, so one client sending
megabytes of headers makes the process hold them all. A head over `MAX_HEAD_BYTES` gets 431 in the
OpenAI error shape; the connection then drops what the client still sends for a moment before
it closes (closing with unread input would reset the connection and lose the answer). Bodies are
bounded by the apps themselves (`gateway.max_body_bytes`, the model servers' own cap).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from budrt.protocol.errors import APIError

MAX_HEAD_BYTES = 64 * 1024  # nginx allows 4 x 8 KiB of headers, Node.js 16 KiB
LINGER_S = 1.0  # after a 431: read and drop input this long, then close
# How long a gateway keeps an idle connection to a model server, and how long a model server keeps
# one open: the server longer, so the gateway always closes first. With uvicorn's 5 s default a
# request sent on a connection the server was closing just then failed (reset) and, with one
# replica, came back as a 503.
UPSTREAM_KEEPALIVE_S = 60
SERVER_KEEPALIVE_S = 75


def _too_large() -> bytes:
    body = APIError(431, "The request's headers are too large.", code="headers_too_large").to_response().body
    head = (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/json\r\n"
        b"connection: close\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    return head + body


class BoundedHeadProtocol(HttpToolsProtocol):
    """Counts the bytes received while a request's head is incomplete; past the bound, 431."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._in_head = True
        self._head_bytes = 0
        self._heads = 0  # heads completed on this connection
        self._refused = False
        super().connection_made(transport)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads += 1
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0  # the next request on this connection

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return
        in_head, heads = self._in_head, self._heads
        super().data_received(data)
        # Only data that began and ended inside one head counts: a chunk that also held the end
        # of a head (and maybe a whole body after it) is not charged to a head.
        if in_head and self._heads == heads:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse()

    def _refuse(self) -> None:
        self._refused = True
        self.transport.write(_too_large())
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then its end of the stream
        self.loop.call_later(LINGER_S, self.transport.close)
