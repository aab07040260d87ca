"""Gateway pieces that need no servers: usage extraction (limiter tests: tests/test_ratelimit.py)."""

from __future__ import annotations

from budrt.gateway.usage import find_usage


def test_find_usage() -> None:
    assert find_usage(b'{"data":[0.1],"usage":{"prompt_tokens":3,"total_tokens":3}}') == {
        "prompt_tokens": 3,
        "total_tokens": 3,
    }
    nested = (
        b'data: {"usage": {"prompt_tokens": 1, "completion_tokens_details": {"x": 1}}}\n\ndata: [DONE]\n\n'
    )
    assert find_usage(nested) == {"prompt_tokens": 1, "completion_tokens_details": {"x": 1}}
    assert find_usage(b'{"usage": null}') is None
    assert find_usage(b'{"usage": {"prompt_tok') is None
    assert find_usage(b"{}") is None
