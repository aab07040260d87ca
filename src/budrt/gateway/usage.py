"""Token usage from upstream responses, found without parsing whole bodies.

Embedding responses can be megabytes of floats; only the `"usage": {...}` object (last in
every OpenAI-shaped body and in the final SSE chunk) is located and decoded.
"""

from __future__ import annotations

from typing import Any

import orjson

from budrt.gateway.metrics import TOKENS, child

_USAGE = b'"usage"'
STREAM_TAIL_BYTES = 8192  # the final chunk with usage is far smaller than this


def find_usage(data: bytes | bytearray) -> dict[str, Any] | None:
    pos = data.rfind(_USAGE)
    if pos < 0:
        return None
    start = data.find(b"{", pos + len(_USAGE))
    if start < 0 or data[pos + len(_USAGE) : start].strip(b" \t\r\n:") != b"":
        return None  # e.g. "usage": null
    # Match braces by jumping between them with bytes.find (C speed): a byte-by-byte Python
    # loop here was a visible share of the gateway's CPU per request.
    depth, i = 0, start
    while True:
        close = data.find(b"}", i)
        if close < 0:
            return None
        opening = data.find(b"{", i, close)
        if opening >= 0:
            depth += 1
            i = opening + 1
            continue
        depth -= 1
        i = close + 1
        if depth == 0:
            try:
                usage = orjson.loads(bytes(data[start:i]))
            except orjson.JSONDecodeError:
                return None
            return usage if isinstance(usage, dict) else None


def record_usage(model: str, data: bytes | bytearray) -> dict[str, Any] | None:
    """Count the usage found in `data` in Prometheus; returns it, so callers need not look again."""
    usage = find_usage(data)
    if not usage:
        return None
    # The Images API names them input and output tokens.
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if isinstance(prompt, int) and prompt > 0:
        child(TOKENS, model, "prompt").inc(prompt)
    if isinstance(completion, int) and completion > 0:
        child(TOKENS, model, "completion").inc(completion)
    return usage
