"""Structured outputs and tool calls through the gateway with the official `openai` SDK: JSON that
parses, schemas that hold, tool calls the SDK accumulates, and bad schemas refused with a 400."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.e2e.conftest import Platform

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
        },
    },
}


class City(BaseModel):
    name: str
    country: str
    population: int


def ask(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def test_json_object_parses_streamed_and_not(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": ask("Describe Paris as JSON."), "max_tokens": 200}
    whole = client.chat.completions.create(response_format={"type": "json_object"}, temperature=0, **kwargs)
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(whole.choices[0].message.content or ""), dict)
    parts = client.chat.completions.create(
        response_format={"type": "json_object"}, temperature=0, stream=True, **kwargs
    )
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == whole.choices[0].message.content


def test_parse_returns_the_pydantic_instance(client: openai.OpenAI) -> None:
    done = client.chat.completions.parse(
        model=MODEL,
        messages=ask("Tell me about Tokyo."),
        response_format=City,
        max_tokens=200,
        temperature=0.7,
        # Seeded: some samples run past max_tokens, which `parse` raises as LengthFinishReasonError
        # (CI met one unseeded; seed 5 is another). The test is about `parse`, not the sample.
        seed=1,
    )
    city = done.choices[0].message.parsed
    assert isinstance(city, City)


def test_n_choices_and_seeds_each_hold_the_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
    done = client.chat.completions.create(
        model=MODEL,
        messages=ask("Is the sky blue?"),
        response_format=fmt,
        n=3,
        seed=11,
        temperature=1.0,
        max_tokens=60,
    )
    assert len(done.choices) == 3
    for choice in done.choices:
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_structured_outputs_regex_choice_and_grammar_on_both_endpoints(client: openai.OpenAI) -> None:
    date = client.chat.completions.create(
        model=MODEL,
        messages=ask("When did it happen?"),
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": r"(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]"}},
    )
    assert re.fullmatch(r"(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]", date.choices[0].message.content or "")
    pick = client.completions.create(
        model=MODEL,
        prompt="The best colour is",
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}},
    )
    assert pick.choices[0].text in {"red", "green", "blue"}
    gbnf = client.completions.create(
        model=MODEL,
        prompt="Answer:",
        max_tokens=10,
        extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}},
    )
    assert gbnf.choices[0].text in {"yes", "no"}


def test_required_tool_call_validates_and_streams_as_the_sdk_accumulates(client: openai.OpenAI) -> None:
    kwargs = {
        "model": MODEL,
        "messages": ask("What is the weather in Paris?"),
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 120,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name in {"get_weather", "get_time"}
    tool = WEATHER if call.function.name == "get_weather" else TIME
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    # Streamed: the deltas carry the same call (ids differ per response).
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            entry["name"] += delta_call.function.name or ""
            entry["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()][:1] == [
        (call.function.name, json.loads(call.function.arguments))
    ]


def test_parallel_calls_each_validate(client: openai.OpenAI) -> None:
    """A small model tends to repeat calls until max_tokens: whatever the finish, every complete
    call parses and validates, and what was cut short comes back as content."""
    done = client.chat.completions.create(
        model=MODEL,
        messages=ask("Weather and time in Rome?"),
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=100,
        temperature=0.8,
        seed=3,
    )
    choice = done.choices[0]
    assert choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
    if choice.finish_reason == "length":
        assert (choice.message.content or "").startswith("<tool_call>")
    else:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None


def test_named_tool_and_the_follow_up_turn(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL,
        messages=ask("Weather in Oslo?"),
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
    )
    [call] = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    follow = client.chat.completions.create(
        model=MODEL,
        messages=[
            *ask("Weather in Oslo?"),
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": -3, "sky": "snow"}'},
        ],
        tools=[WEATHER, TIME],
        tool_choice="none",
        max_tokens=30,
    )
    assert follow.choices[0].finish_reason in ("stop", "length")
    assert follow.choices[0].message.content


def test_auto_may_answer_in_text(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(
        model=MODEL,
        messages=ask("Say hello."),
        tools=[TIME],
        tool_choice="auto",
        max_tokens=30,
        temperature=0,
    )
    choice = done.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.message.content and not choice.message.content.startswith("<")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}},
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "deep", "schema": json.loads('{"items":' * 40 + "{}" + "}" * 40)},
                }
            },
            "response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "big", "schema": {"enum": ["x" * 1000] * 70}},
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs"),
        ({"guided_regex": "[0-9]+"}, "guided_regex"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_constraints_are_400_naming_the_param(platform: Platform, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": ask("hi"), "max_tokens": 4, **extra}
    headers = {"Authorization": f"Bearer {platform.admin_key}"}
    r = httpx.post(f"{platform.base_url}/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0].split("[")[0] == param, r.text


def test_compiles_and_cache_hits_are_counted(client: openai.OpenAI, platform: Platform) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": schema}}
    for _ in range(2):  # the second finds it compiled
        client.chat.completions.create(
            model=MODEL, messages=ask("A number?"), response_format=fmt, max_tokens=12
        )
    internal = (platform.home / "run" / "internal.key").read_text()
    [server] = [
        p for p in platform.status()["processes"] if p["kind"] == "model-server" and MODEL in p["models"]
    ]
    text = httpx.get(f"{server['url']}/metrics", headers={"Authorization": f"Bearer {internal}"}).text

    def value(name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))

    assert value("budrt:grammar_compiles_total") >= 1
    assert value("budrt:grammar_cache_hits_total") >= 1
    assert value("budrt:grammar_compile_seconds_count") >= 1
