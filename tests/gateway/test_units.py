"""Gateway pieces that need no servers: the rate limiter and usage extraction."""

from __future__ import annotations

import pytest

from budrt.gateway import ratelimit
from budrt.gateway.usage import find_usage


def test_sliding_window(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(ratelimit.time, "monotonic", lambda: now[0])
    limiter = ratelimit.SlidingWindowLimiter()
    assert limiter.check(1, None) == {}
    limiter.check(1, 2)
    now[0] += 30
    assert limiter.check(1, 2)["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(ratelimit.RateLimited) as exc:
        limiter.check(1, 2)
    assert exc.value.headers()["Retry-After"] == "30"
    limiter.check(2, 2)  # other keys are independent
    now[0] += 30.001  # the first hit left the window
    limiter.check(1, 2)


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
