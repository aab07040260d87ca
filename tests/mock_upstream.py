"""A tiny OpenAI-shaped model server for gateway tests, plus a helper to serve ASGI apps.

Per-request behaviour is chosen by an extra body field `"mock"` (the gateway forwards bodies
unchanged): "hang", "bad_request", "huge" (a 200 of `"mock_bytes"` bytes, chunked without a
Content-Length when `"mock_chunked"`); streams take `"mock_chunks"` and `"mock_delay"`;
`"mock_status": N` answers N with an error body; `"mock_headers": [[name, value], ...]` adds
response headers. Per-instance behaviour is `MockUpstream.mode`: "ok", an HTTP status such as
"500" or "503" (503 with Retry-After), "hang" (set over HTTP with `POST /_mode/<mode>`).
`POST /v1/images/generations` answers real images (Pillow) as b64_json with the usage of budrt's
image servers; `"mock": "bad_b64"` sends an image that is not base64.
`python -m tests.mock_upstream --port N --name X` runs one as a process.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import socket
import threading
import time
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MOCK_STEPS = 4  # denoising steps per image the mock reports


def chat_response(name: str, model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "served_by": name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        }
    )


def image_bytes(index: int, size: tuple[int, int], fmt: str = "png") -> bytes:
    """A small real picture (a different colour per index) in `fmt`."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, ((40 * index) % 256, 120, 200)).save(out, IMAGE_FORMATS[fmt])
    return out.getvalue()


def _refused(message: str) -> tuple[int, bytes]:
    return 400, orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})


def image_response(body: dict[str, Any]) -> tuple[int, bytes]:
    """(status, body) of an image generation, as budrt's image servers answer one: 400 for what
    they refuse (bounds kept tiny: the fuzz sends any `n` and `size`)."""
    n, size, fmt = body.get("n", 1), body.get("size") or "8x8", body.get("output_format", "png")
    shape = re.fullmatch(r"([1-9][0-9]?)x([1-9][0-9]?)", size) if isinstance(size, str) else None
    if n.__class__ is not int or not 1 <= n <= 4 or shape is None:
        return _refused("mock refuses this n or size")
    if not isinstance(fmt, str) or fmt not in IMAGE_FORMATS:
        return _refused("mock refuses this output_format")
    if body.get("response_format", "b64_json") != "b64_json":
        return _refused("mock answers b64_json only")
    width, height = int(shape[1]), int(shape[2])
    images = [base64.b64encode(image_bytes(i, (width, height), fmt)).decode() for i in range(n)]
    if body.get("mock") == "bad_b64":
        images[-1] = "not base64!"
    prompt = len(str(body.get("prompt", ""))) // 4 + 1
    usage = {
        "input_tokens": prompt,
        "output_tokens": 0,
        "total_tokens": prompt,
        "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0},
        "images": n,
        "pixels": n * width * height,
        "steps": n * MOCK_STEPS,
    }
    data = [{"b64_json": image, "revised_prompt": f"revised {i}"} for i, image in enumerate(images)]
    answer = {"created": 1700000000, "data": data, "output_format": fmt, "size": size, "usage": usage}
    return 200, orjson.dumps(answer)


def stream_chunk(i: int, model: str) -> bytes:
    data = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(data) + b"\n\n"


class MockUpstream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.ready = True
        self.requests = 0
        self.cancelled = 0  # requests (stream or not) abandoned by the client mid-way
        self.last_headers: dict[str, str] = {}
        self.last_body: dict[str, Any] = {}
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/images/generations", self.images, methods=["POST"]),
                Route("/health/ready", self.health),
                Route("/_stats", self.stats),
                Route("/_mode/{mode}", self.set_mode, methods=["POST"]),
            ]
        )

    async def set_mode(self, request: Request) -> Response:
        self.mode = request.path_params["mode"]
        return Response(b"{}", media_type="application/json")

    async def health(self, request: Request) -> Response:
        return Response(b"{}", status_code=200 if self.ready else 503, media_type="application/json")

    async def stats(self, request: Request) -> Response:
        return Response(orjson.dumps({"requests": self.requests, "cancelled": self.cancelled}))

    async def images(self, request: Request) -> Response:
        self.requests += 1
        self.last_headers = dict(request.headers)
        try:
            self.last_body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return Response(
                b'{"error":{"message":"not JSON"}}', status_code=400, media_type="application/json"
            )
        body = self.last_body if isinstance(self.last_body, dict) else {}
        status, answer = await asyncio.to_thread(image_response, body)
        return Response(answer, status_code=status, media_type="application/json")

    async def chat(self, request: Request) -> Response:
        # Wrapped so the handler itself can watch for the client going away.
        return _RawResponse(self, request)

    async def serve(self, body: dict[str, Any], send: Send) -> None:
        model = body.get("model", "")
        status = int(self.mode) if self.mode.isdigit() else body.get("mock_status")
        if isinstance(status, int):
            headers = [(b"content-type", b"application/json")]
            if status == 503:
                headers.append((b"retry-after", b"7"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b'{"error":{"message":"mock failure"}}'})
            return
        if body.get("mock") == "huge":
            await _send_huge(send, int(body.get("mock_bytes", 0)), bool(body.get("mock_chunked")))
            return
        if body.get("mock") == "hang" or self.mode == "hang":
            await asyncio.sleep(3600)
        if body.get("mock") == "bad_request":
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send(
                {"type": "http.response.body", "body": b'{"error":{"message":"mock says no","code":"x"}}'}
            )
            return
        if body.get("stream") is True:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            delay = float(body.get("mock_delay", 0))
            for i in range(int(body.get("mock_chunks", 3))):
                await send({"type": "http.response.body", "body": stream_chunk(i, model), "more_body": True})
                if delay:
                    await asyncio.sleep(delay)
                if body.get("mock") == "die" and i + 1 >= int(body.get("mock_die_after", 0)):
                    raise RuntimeError("mock upstream dies mid-stream")  # uvicorn drops the connection
            usage = {
                "id": "chatcmpl-mock",
                "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3},
            }
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + orjson.dumps(usage) + b"\n\n",
                    "more_body": True,
                }
            )
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        headers = [(b"content-type", b"application/json")]
        headers += [(n.encode(), v.encode()) for n, v in body.get("mock_headers", [])]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": chat_response(self.name, model)})


async def _send_huge(send: Send, size: int, chunked: bool) -> None:
    """A 200 JSON-ish body of `size` bytes, sent 1 MiB at a time."""
    headers = [(b"content-type", b"application/json")]
    if not chunked:
        headers.append((b"content-length", b"%d" % size))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    block = b"x" * (1 << 20)
    while size > 0:
        piece = block[: min(size, len(block))]
        size -= len(piece)
        try:
            await send({"type": "http.response.body", "body": piece, "more_body": size > 0})
        except OSError:  # the gateway hung up on it
            return


class _RawResponse:
    def __init__(self, upstream: MockUpstream, request: Request) -> None:
        self.upstream = upstream
        self.request = request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        up = self.upstream
        raw = await self.request.body()
        up.requests += 1
        up.last_headers = dict(self.request.headers)
        up.last_body = orjson.loads(raw)

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(up.serve(up.last_body, send))
        watch = asyncio.ensure_future(disconnected())
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            up.cancelled += 1
            work.cancel()
        watch.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Serves an ASGI app with uvicorn on a free port in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="mock")
    parser.add_argument("--mode", default="ok")
    args = parser.parse_args()
    upstream = MockUpstream(args.name)
    upstream.mode = args.mode
    uvicorn.run(upstream.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
