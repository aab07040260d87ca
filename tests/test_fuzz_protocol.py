"""Property-based fuzz of the model servers' request parsing (protocol/schemas.py).

Whatever JSON object a client sends, the server's parsing either refuses it with a 400 that has
the OpenAI error shape, or yields a request whose derived values (stop list, output limit,
prompts, message text, sampling parameters) can be computed without an exception the routes
would turn into a 500. Fixed seed and budget.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from budrt.protocol.errors import APIError, from_validation_error
from budrt.protocol.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from budrt.server.generation import sampling_params

SEED = 14
BUDGET = settings(
    max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)

EDGE_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 1e308, -1e308, 0.5])
ODD_DIGITS = st.sampled_from(["²", "١٢", "-0", "007", "+1", " 1", "1.0"])  # digits to isdigit(), not to int()
EDGE_TEXT = st.sampled_from(["", " ", "0", "-1", "²", "١", "1e3", "inf", "nan", "\x00", "text", "user"])
SCALARS = st.none() | st.booleans() | st.integers() | EDGE_NUMBERS | st.floats(allow_nan=False) | EDGE_TEXT
JSON = st.recursive(
    SCALARS | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(EDGE_TEXT | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | JSON},
    optional={
        "content": st.text(max_size=20)
        | st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "image_url"]) | JSON}, optional={"text": JSON}
            )
        )
        | JSON,
        "name": JSON,
    },
)
# Values near what each field expects (so many bodies get past validation), or anything at all.
NEAR = {
    "messages": st.lists(MESSAGE, max_size=3),
    "prompt": st.text(max_size=10)
    | st.lists(st.integers(-5, 300), max_size=5)
    | st.lists(st.text(max_size=5)),
    "input": st.text(max_size=10)
    | st.lists(st.text(max_size=5), max_size=3)
    | st.lists(st.integers(), max_size=3),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5),
    "logit_bias": st.dictionaries(
        ODD_DIGITS | st.integers(-3, 300).map(str), st.floats(-150, 150), max_size=3
    ),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": JSON}),
    "model": st.just("m") | JSON,
}


def typed(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of a field's type, small or at the edges."""
    kind = str(annotation)
    if "bool" in kind:
        return st.booleans()
    if "int" in kind:
        return st.integers(-2, 40) | EDGE_NUMBERS.filter(lambda v: isinstance(v, int))
    if "float" in kind:
        return st.floats(-3, 3) | EDGE_NUMBERS
    return st.text(max_size=8) | EDGE_TEXT


VALID_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=8)}
    ),
    min_size=1,
    max_size=3,
)
BASE = {
    ChatCompletionRequest: {"messages": VALID_MESSAGES},
    CompletionRequest: {"prompt": st.text(min_size=1, max_size=8)},
    EmbeddingRequest: {"input": st.text(min_size=1, max_size=8)},
}


@st.composite
def bodies(draw: st.DrawFn, model: type[BaseModel]) -> dict[str, Any]:
    """A valid body with up to three fields set to something near their type, at an edge, or
    anything at all: most bodies get past validation, each with a few odd values."""
    body = {"model": "m", **draw(st.fixed_dictionaries(BASE[model]))}
    names = sorted(n for n in model.model_fields if n != "model")
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        near = NEAR[name] if name in NEAR else typed(model.model_fields[name].annotation)
        body[name] = draw(st.one_of(near, near, EDGE_NUMBERS | SCALARS, JSON))
    return body


def parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """As the server's `validate`: the request, or None after checking the 400 it answers."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = from_validation_error(exc)
    assert isinstance(error, APIError) and error.status == 400
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    return None


@seed(SEED)
@BUDGET
@given(body=bodies(ChatCompletionRequest))
def test_chat_bodies_parse_or_400(body: dict[str, Any]) -> None:
    req = parse(ChatCompletionRequest, body)
    if req is None:
        return
    for message in req.messages:
        try:
            message.text()
        except ValueError:
            pass  # the route answers 400 (param "messages")
    req.output_limit()
    sampling_params(req, 16, None, req.n - 1)


@seed(SEED)
@BUDGET
@given(body=bodies(CompletionRequest))
def test_completion_bodies_parse_or_400(body: dict[str, Any]) -> None:
    req = parse(CompletionRequest, body)
    if req is None:
        return
    assert req.prompts()
    sampling_params(req, 16, req.logprobs, req.n - 1)


@seed(SEED)
@BUDGET
@given(body=bodies(EmbeddingRequest))
def test_embedding_bodies_parse_or_400(body: dict[str, Any]) -> None:
    parse(EmbeddingRequest, body)


def test_a_non_ascii_digit_logit_bias_key_is_a_400() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"²": 1.0}}
    assert parse(ChatCompletionRequest, body) is None  # a 400, before any int() of the key
