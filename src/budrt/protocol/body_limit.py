"""A cap on request bodies, answered with a 413 in the OpenAI error shape before the rest is read.

Starlette's own `max_body_size` answers a declared-too-long body in plain text, so it is not used.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from budrt.protocol.errors import APIError


def body_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large")


class BodyLimit:
    """ASGI middleware: a body declared (Content-Length) or found longer than `max_bytes` is refused.

    A declared length is refused before anything is read; a chunked body when its running total
    passes the cap (the `APIError` raised from `receive` reaches the app's error handlers).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        # (ASCII digits only: "²".isdigit() is true too; a 19+ digit length is over any cap)
        if (
            declared.isascii()
            and declared.isdigit()
            and (len(declared) > 18 or int(declared) > self.max_bytes)
        ):
            await body_too_large(self.max_bytes).to_response()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise body_too_large(self.max_bytes)
            return message

        await self.app(scope, limited, send)
