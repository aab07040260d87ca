"""OpenAI error shapes and status codes."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from budrt.protocol.errors import (
    APIError,
    context_too_long,
    from_validation_error,
    model_not_found,
    overloaded,
    parse_json_body,
    unauthorized,
)
from budrt.protocol.schemas import ChatCompletionRequest, EmbeddingRequest


def _body(err: APIError) -> dict:
    response = err.to_response()
    return {"status": response.status_code, **orjson.loads(response.body), "headers": dict(response.headers)}


def test_shapes_and_statuses() -> None:
    for err, status, kind in [
        (model_not_found("x"), 404, "not_found_error"),
        (unauthorized(), 401, "authentication_error"),
        (overloaded(retry_after=3), 503, "service_unavailable"),
        (context_too_long(3000, 100, 2048), 400, "invalid_request_error"),
    ]:
        body = _body(err)
        assert body["status"] == status
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == kind
    assert _body(overloaded(retry_after=3))["headers"]["retry-after"] == "3"
    assert _body(context_too_long(3000, 100, 2048))["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "m", "messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"a": 1}},
            "logit_bias",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "stop"),
    ],
)
def test_validation_errors_name_the_param(payload: dict, param: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate(payload)
    err = from_validation_error(exc.value)
    assert err.status == 400
    assert err.param == param


def test_embedding_input_checks() -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": []})
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": "x", "encoding_format": "int8"})


@pytest.mark.parametrize("raw", [b"", b"{nope", b"[1, 2]", b'"text"'])
def test_bad_json_bodies(raw: bytes) -> None:
    with pytest.raises(APIError) as exc:
        parse_json_body(raw)
    assert exc.value.status == 400
