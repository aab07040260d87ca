"""The grammar a request's output must follow, decided once from its fields, and compiled before the
request is queued (in a worker thread: neither the event loop nor the engine waits for it)."""

from __future__ import annotations

import asyncio

from budrt.engine.grammar import CompiledGrammar, Grammar, GrammarError
from budrt.engine.interface import Engine
from budrt.protocol.errors import invalid_request
from budrt.protocol.schemas import SamplingFields
from budrt.protocol.structured import StructuredOutputs
from budrt.server.tools import ToolPlan


def output_grammar(req: SamplingFields, tools: ToolPlan | None) -> tuple[Grammar, str] | None:
    """(the grammar, the parameter that asked for it), or None for free text. One constraint per
    request: tools, `response_format` or `structured_outputs`."""
    fmt = (
        req.response_format
        if req.response_format is not None and req.response_format.type != "text"
        else None
    )
    structured = req.structured_outputs
    asked = [
        name
        for name, given in (("tools", tools), ("response_format", fmt), ("structured_outputs", structured))
        if given
    ]
    if len(asked) > 1:
        raise invalid_request(
            f"'{asked[0]}' and '{asked[1]}' cannot be combined in one request.", param=asked[1]
        )
    try:
        if tools is not None:
            return tools.grammar(), "tools"
        if fmt is not None:
            schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
            grammar = (
                Grammar.json_schema(schema) if fmt.type == "json_schema" and schema else Grammar.json_object()
            )
            return grammar, "response_format"
        if structured is not None:
            return _structured(structured), "structured_outputs"
    except GrammarError as exc:
        raise invalid_request(f"Invalid value for '{asked[0]}': {exc}", param=asked[0]) from None
    return None


def _structured(spec: StructuredOutputs) -> Grammar:
    if spec.json_ is not None:
        return Grammar.json_schema(spec.json_)  # type: ignore[arg-type]  # parsed by the validator
    if spec.regex is not None:
        return Grammar.regex(spec.regex)
    if spec.choice is not None:
        return Grammar.choice(spec.choice)
    if spec.grammar is not None:
        return Grammar.lark_or_gbnf(spec.grammar)
    return Grammar.json_object()


async def compile_output_grammar(
    engine: Engine, wanted: tuple[Grammar, str] | None
) -> CompiledGrammar | None:
    """The compiled grammar (cached by the engine), or a 400 naming the parameter."""
    if wanted is None:
        return None
    grammar, param = wanted
    try:
        return await asyncio.to_thread(engine.compile_grammar, grammar)
    except GrammarError as exc:
        raise invalid_request(f"Invalid value for '{param}': {exc}", param=param) from None
