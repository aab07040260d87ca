"""OpenAI-style errors: one exception type, one JSON shape, the right HTTP status.

Every failure that reaches a client goes through `APIError.to_response`, so no stack trace
ever leaves a process.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError
from starlette.responses import Response

# HTTP status -> OpenAI error "type" (as api.openai.com sends them).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error a client is meant to see."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self) -> Response:
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody receives it


async def client_left(request: Any, exc: Exception) -> Response:
    """Exception handler for Starlette's ClientDisconnect (the client hung up while sending its
    body): nothing to answer, nothing to log as a server error."""
    return Response(status_code=CLIENT_CLOSED)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


MAX_ECHO = 256  # characters of a client's value repeated in an error message


def model_not_found(model: str) -> APIError:
    shown = model if len(model) <= MAX_ECHO else model[:MAX_ECHO] + "..."  # not a megabyte back
    return APIError(
        404,
        f"The model `{shown}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str = "Invalid or missing API key.") -> APIError:
    return APIError(401, message, code="invalid_api_key")


def overloaded(message: str = "The server is overloaded; retry later.", retry_after: int = 1) -> APIError:
    return APIError(503, message, code="server_overloaded", headers={"Retry-After": str(retry_after)})


def context_too_long(
    prompt_tokens: int, max_tokens: int, max_model_len: int, param: str = "messages"
) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
        "completion). Please reduce the length of the messages or completion.",
        param=param,
        code="context_length_exceeded",
    )


def database_unavailable() -> APIError:
    return APIError(
        503,
        "The metadata database is unavailable; retry later.",
        code="database_unavailable",
        headers={"Retry-After": "1"},
    )


def body_too_large(max_bytes: int) -> APIError:
    return APIError(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large")


def internal_error() -> APIError:
    return APIError(500, "The server had an error while processing your request.", code="internal_error")


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def param_path(loc: tuple[int | str, ...]) -> str | None:
    """`("messages", 0, "role")` -> `messages[0].role`; pydantic's union-member tags are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in _UNION_TAGS or part.startswith(("function-", "constrained-")):
            continue
        else:
            path += f".{part}" if path else part
    return path or None


def from_validation_error(exc: ValidationError) -> APIError:
    """Map the first pydantic error to a 400 naming the offending parameter.

    Of a union's errors for that parameter (`str | list[str]`...), the one that is not a mere type
    mismatch says what is wrong (a list of 5 stop strings: "too long", not "not a string").
    """
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": "Invalid request.", "type": ""}
    same = [e for e in errors if e["loc"][:1] == first["loc"][:1] and not e["type"].endswith("_type")]
    first = same[0] if same else first
    param = param_path(tuple(first.get("loc", ())))
    message = str(first.get("msg", "Invalid request.")).removeprefix("Value error, ")
    if param:
        message = f"Invalid value for '{param}': {message}"
    return APIError(400, message, param=param, code="invalid_value")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body or raise a 400."""
    if not raw:
        raise invalid_request("The request body is empty; expected a JSON object.")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_request("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.")
    return data
