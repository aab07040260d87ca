"""A cap on request bodies, answered with a 413 in the OpenAI error shape before the rest is read.

Starlette's own `max_body_size` answers a declared-too-long body in plain text, so it is not used.
The gateway's proxied paths, which skip middleware, read their body with the same rules
(`gateway/app.py` `read_body`).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from budrt.protocol.errors import body_too_large


def declared_length(scope: Scope) -> int:
    """The request's Content-Length, or -1 when none (chunked) or not a number."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            # bytes.isdigit() is ASCII only ("²" is not a digit here); a 19+ digit length is over
            # any cap, and int() refuses 4300+ digits.
            if not value.isdigit():
                return -1
            return int(value) if len(value) < 19 else 1 << 63
    return -1


class LimitedReceive:
    """`receive` that raises the 413 (an APIError, so the app's handlers answer it) once the
    body passes `limit` bytes, whoever reads it."""

    __slots__ = ("receive", "limit", "left")

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.left = limit

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.left -= len(message.get("body", b""))
            if self.left < 0:
                raise body_too_large(self.limit)
        return message


class BodyLimit:
    """ASGI middleware: a body declared (Content-Length) longer than `max_bytes` is refused before
    anything is read; a chunked one when its running total passes the cap."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif declared_length(scope) > self.max_bytes:
            await body_too_large(self.max_bytes).to_response()(scope, receive, send)
        else:
            await self.app(scope, LimitedReceive(receive, self.max_bytes), send)
