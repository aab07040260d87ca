"""Request fields that constrain what a model writes: `response_format` (OpenAI), `structured_outputs`
(vLLM's spelling since 0.10.2) and function tools (`tools`, `tool_choice`, messages' `tool_calls`).

Here they are only validated as shapes and bounded in size; whether a schema or a grammar compiles
is the engine's to say (`engine.grammar`), and the model server maps both to a 400 naming the param.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema or a grammar, as sent
MAX_SCHEMA_DEPTH = 32  # nesting of a JSON schema's objects and arrays
MAX_TOOLS = 128
MAX_CHOICES = 1024
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Part(BaseModel):
    model_config = ConfigDict(
        extra="ignore", protected_namespaces=(), strict=True, allow_inf_nan=False, populate_by_name=True
    )


def check_schema(value: Any) -> Any:
    """A JSON schema small and shallow enough to compile: at most `MAX_SCHEMA_BYTES` as JSON and
    `MAX_SCHEMA_DEPTH` levels of nesting."""
    if not isinstance(value, dict):
        raise ValueError("a JSON schema must be an object")
    if _depth(value, 0) > MAX_SCHEMA_DEPTH:
        raise ValueError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if len(orjson.dumps(value)) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
    return value


def _depth(value: Any, level: int) -> int:
    """How deep `value` nests, stopping as soon as it passes the limit (a hostile body can nest
    thousands of levels: orjson parses up to 1024)."""
    if level > MAX_SCHEMA_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(child, level + 1) for child in children), default=level)


Schema = Annotated[dict[str, Any], Field()]


class JsonSchemaFormat(_Part):
    name: str = Field(default="response", pattern=TOOL_NAME)
    description: str | None = Field(default=None, max_length=4096)
    schema_: Schema = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _check(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_schema(value)


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs 'json_schema' with a 'schema'")
        return self


class StructuredOutputs(_Part):
    """vLLM's `structured_outputs` (one of its constraints per request)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = Field(default=None, max_length=MAX_SCHEMA_BYTES)
    choice: (
        Annotated[list[Annotated[str, Field(max_length=4096)]], Field(min_length=1, max_length=MAX_CHOICES)]
        | None
    ) = None
    grammar: str | None = Field(default=None, min_length=1, max_length=MAX_SCHEMA_BYTES)
    json_object: bool | None = None

    @field_validator("json_")
    @classmethod
    def _check_json(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(value, str):
            if len(value) > MAX_SCHEMA_BYTES:
                raise ValueError(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise ValueError("'json' is not valid JSON") from None
        return None if value is None else check_schema(value)

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [self.json_, self.regex, self.choice, self.grammar, self.json_object or None]
        if sum(v is not None for v in given) != 1:
            raise ValueError("give exactly one of 'json', 'regex', 'choice', 'grammar', 'json_object'")
        return self


class FunctionDefinition(_Part):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = Field(default=None, max_length=8192)
    parameters: Schema | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _check(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_schema(value)


class Tool(_Part):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Part):
    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
Tools = Annotated[list[Tool], Field(max_length=MAX_TOOLS, fail_fast=True)]


class FunctionCall(_Part):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=MAX_SCHEMA_BYTES)


class ToolCall(_Part):
    """A call the assistant made, as a client sends it back in the next turn's messages."""

    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


# The vLLM request fields older than `structured_outputs`: refused with a pointer to it, not
# silently ignored (a client that sends one expects its output constrained).
LEGACY_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend")
