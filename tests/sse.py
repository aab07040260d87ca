"""Reading SSE streams in tests as the OpenAI SDK does."""

from __future__ import annotations

from collections.abc import Iterator

import httpx


def sse_data(stream: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of an SSE stream, split only at "\\n" as SSE does: a random model's
    text may hold characters (U+0085, U+2028...) where httpx's iter_lines (str.splitlines) splits."""
    buffer = b""
    for chunk in stream.iter_bytes():
        *lines, buffer = (buffer + chunk).split(b"\n")
        yield from (line[6:].rstrip(b"\r").decode() for line in lines if line.startswith(b"data: "))
