"""Function tools: how a chat with `tools` is shown to the model, the grammar its reply follows, and
reading the reply back into `tool_calls`.

Chat templates that know no tools (SmolLM2's among them) get the tools in the system message, in a
documented format (docs/structured-outputs.md): each call is a block

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and the grammar guarantees the blocks: a name among the tools and arguments valid against that
tool's schema. With `tool_choice: "auto"` the reply is either such blocks or text that does not
start with "<"; with "required" or a named tool, only blocks (one, unless `parallel_tool_calls`).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from budrt.engine.grammar import Grammar
from budrt.protocol.schemas import ChatCompletionRequest, ChatMessage
from budrt.protocol.structured import Tool

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_BLOCK = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)
# Compact, one-line JSON as models write it: the same separators as response_format's grammars.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolPlan:
    """What a request allows the model to call, decided once from `tools` and `tool_choice`."""

    tools: list[Tool]
    mode: Literal["auto", "required"]
    parallel: bool

    @classmethod
    def of(cls, req: ChatCompletionRequest) -> ToolPlan | None:
        """None when the request has no tools or `tool_choice` is "none"."""
        choice = req.tool_choice or "auto"
        if not req.tools or choice == "none":
            return None
        if isinstance(choice, str):
            return cls(list(req.tools), choice, req.parallel_tool_calls)  # type: ignore[arg-type]
        named = [t for t in req.tools if t.function.name == choice.function.name]
        return cls(named, "required", False)

    def grammar(self) -> Grammar:
        calls = 'call ("\\n" call)*' if self.parallel else "call"
        schema = json.dumps({"x-guidance": _JSON_STYLE, "anyOf": [_call_schema(t) for t in self.tools]})
        rules = f'calls: {calls}\ncall: "<tool_call>\\n" %json {schema} "\\n</tool_call>"\n'
        if self.mode == "required":
            return Grammar.lark("start: calls\n" + rules)
        return Grammar.lark("start: calls | TEXT\nTEXT: /[^<](.|\\n)*/\n" + rules)

    def system_prompt(self) -> str:
        listed = "\n".join(
            json.dumps(
                {
                    "name": t.function.name,
                    "description": t.function.description or "",
                    "parameters": t.function.parameters or {"type": "object"},
                }
            )
            for t in self.tools
        )
        how = (
            "You must call a tool." if self.mode == "required" else "If no tool helps, answer in plain text."
        )
        return (
            "You can call these tools (one JSON object each, with the JSON schema of its arguments):\n"
            f"{listed}\n"
            "To call a tool, reply with a block for each call and nothing else:\n"
            f'{OPEN}{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}{CLOSE}\n{how}'
        )

    def may_call(self, text: str) -> bool:
        """Whether a reply that starts with `text` (not empty) is tool calls rather than content."""
        return self.mode == "required" or text.startswith("<")


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def chat_messages(req: ChatCompletionRequest, plan: ToolPlan | None) -> list[dict[str, str]]:
    """The request's messages as the chat template takes them (`{"role", "content"}`): earlier
    tool calls and tool results written as the model sees them, and the tools in the system
    message. Raises ValueError for content the model cannot read."""
    messages = [{"role": _role(m), "content": _content(m)} for m in req.messages]
    if plan is None:
        return messages
    prompt = plan.system_prompt()
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _role(message: ChatMessage) -> str:
    return "system" if message.role == "developer" else message.role


def _content(message: ChatMessage) -> str:
    text = message.text()
    if message.role == "tool":
        return f"<tool_response>\n{text}\n</tool_response>"
    calls = [_block(call.function.name, call.function.arguments) for call in message.tool_calls or []]
    return "\n".join([text, *calls] if text else calls)


def _block(name: str, arguments: str) -> str:
    try:  # the client sends arguments back as it got them: a JSON text
        parsed: Any = json.loads(arguments)
    except ValueError:
        parsed = arguments
    return OPEN + json.dumps({"name": name, "arguments": parsed}, ensure_ascii=False) + CLOSE


def parse_calls(text: str) -> list[dict[str, Any]]:
    """The complete call blocks in `text`, in order, as the API's `tool_calls` entries."""
    calls = []
    for block in _BLOCK.findall(text):
        try:
            call = json.loads(block)
            name, arguments = call["name"], call["arguments"]
        except (ValueError, KeyError, TypeError):
            continue  # only a reply cut by max_tokens or a stop string can hold a broken block
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        )
    return calls


def split_reply(plan: ToolPlan, text: str) -> tuple[str, list[dict[str, Any]]]:
    """A whole reply as (content, tool calls): calls when it is call blocks, else its text."""
    if not text or not plan.may_call(text):
        return text, []
    return _BLOCK.sub("", text).strip("\n"), parse_calls(text)


@dataclass
class CallStream:
    """One choice's reply as it streams: content until it turns out to be tool calls, then each
    call as a `tool_calls` delta once its block is complete."""

    plan: ToolPlan
    text: str = ""
    calling: bool | None = None  # None until the first character decides
    sent: int = 0  # calls sent so far

    def add(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to send, new calls to send) after `piece` of the reply."""
        self.text += piece
        if self.calling is None and self.text:
            self.calling = self.plan.may_call(self.text)
        if not self.calling:
            return piece, []
        calls = parse_calls(self.text)[self.sent :]
        for k, call in enumerate(calls):
            call["index"] = self.sent + k
        self.sent += len(calls)
        return "", calls

    def leftover(self) -> str:
        """What a call reply ends with that is no complete block (a reply cut short): sent as
        content at the end, so nothing the model wrote is lost."""
        if not self.calling:
            return ""
        return _BLOCK.sub("", self.text).strip("\n")
