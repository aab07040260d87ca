"""server/tools.py and its use in formatting: the tool prompt, replies read back into `tool_calls`,
streamed deltas, and earlier turns written as the model sees them (no model needed)."""

from __future__ import annotations

import json

from budrt.engine.interface import GenerationOutput
from budrt.protocol.schemas import ChatCompletionRequest
from budrt.server.formatting import ChatFormat, ChoiceResult
from budrt.server.tools import ToolPlan, chat_messages, split_reply

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def request(**extra: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER], **extra}
    return ChatCompletionRequest.model_validate(body)


def out(text: str, finish: str | None = None) -> GenerationOutput:
    return GenerationOutput("r", text, [1], finish, 5, 1)  # type: ignore[arg-type]


def test_the_plan_follows_tool_choice() -> None:
    assert ToolPlan.of(request(tool_choice="none")) is None
    assert (
        ToolPlan.of(ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user"}]}))
        is None
    )
    auto = ToolPlan.of(request())
    assert auto is not None and auto.mode == "auto" and auto.parallel
    named = ToolPlan.of(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named is not None and named.mode == "required" and not named.parallel
    # "auto" lets the reply be text not starting with "<"; a named tool allows only its calls.
    assert "TEXT" in auto.grammar().text and "TEXT" not in named.grammar().text
    assert "get_weather" in named.grammar().text


def test_a_reply_of_calls_and_a_reply_of_text() -> None:
    plan = ToolPlan.of(request())
    assert plan is not None
    content, calls = split_reply(plan, CALL + "\n" + CALL)
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather"] * 2
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["id"].startswith("call_")
    assert split_reply(plan, "It is sunny.") == ("It is sunny.", [])
    # Cut by max_tokens in the second block: the first call, and the rest as content.
    content, calls = split_reply(plan, CALL + '\n<tool_call>\n{"name": "get_w')
    assert len(calls) == 1 and content == '<tool_call>\n{"name": "get_w'


def test_whole_and_streamed_answers() -> None:
    fmt = ChatFormat("id", "m", False, ToolPlan.of(request()))
    choice = ChoiceResult()
    choice.add(out(CALL, "stop"))
    message = fmt.response([choice], 5, [])["choices"][0]
    assert message["finish_reason"] == "tool_calls" and message["message"]["content"] is None
    assert message["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    pieces = [CALL[:5], CALL[5:30], CALL[30:], ""]
    chunks = [fmt.chunk(0, out(p, "stop" if i == len(pieces) - 1 else None)) for i, p in enumerate(pieces)]
    deltas = [c["choices"][0] for c in chunks if c is not None]
    assert all("content" not in d["delta"] for d in deltas)
    [with_call] = [d for d in deltas if "tool_calls" in d["delta"]]
    assert with_call["delta"]["tool_calls"][0]["index"] == 0
    assert deltas[-1]["finish_reason"] == "tool_calls"
    text = ChatFormat("id2", "m", False, ToolPlan.of(request()))
    first = text.chunk(0, out("Sunny", None))
    assert first is not None and first["choices"][0]["delta"] == {"content": "Sunny"}


def test_earlier_turns_are_written_as_the_model_sees_them() -> None:
    req = request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "snow"}'},
        ]
    )
    messages = chat_messages(req, ToolPlan.of(req))
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\nYou can call")
    assert messages[2] == {"role": "assistant", "content": CALL}
    assert messages[3] == {"role": "tool", "content": '<tool_response>\n{"sky": "snow"}\n</tool_response>'}
    assert chat_messages(req, None)[0] == {"role": "system", "content": "Be brief."}
