"""A fast mock OpenAI upstream for benchmarks: raw asyncio + httptools on uvloop, keep-alive.

    python bench/mock_upstream.py --port 9001

Every POST gets the same chat-completion JSON (with `usage`); GET /health/ready gets `{}`.
It does almost nothing per request, so a benchmark through the gateway measures the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import httptools
import uvloop

RESPONSE_BODY = json.dumps(
    {
        "id": "chatcmpl-0123456789abcdef",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Batching raises throughput but adds queueing."},
            }
        ],
        "usage": {"prompt_tokens": 41, "completion_tokens": 9, "total_tokens": 50},
    },
    separators=(",", ":"),
).encode()


def _response(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


CHAT = _response(RESPONSE_BODY)
HEALTH = _response(b"{}")


class Mock(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(HEALTH if self.url.startswith(b"/health") else CHAT)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Mock, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvloop.run(serve(args.host, args.port))
