"""OpenAI response shapes for chat and text completions, whole and as SSE chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from budrt.engine.interface import GenerationOutput, TokenLogprob
from budrt.server.tools import CallStream, ToolPlan, split_reply


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class ChoiceResult:
    """Accumulates one choice's increments into a whole answer."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def add(self, out: GenerationOutput) -> None:
        self.text.append(out.text)
        self.completion_tokens = out.completion_tokens
        if out.finish_reason is not None:
            self.finish_reason = "stop" if out.finish_reason == "abort" else out.finish_reason
        if out.logprobs:
            self.logprobs.extend(out.logprobs)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return {
        "content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, p) for _, t, p in lp.top]}
            for lp in items
        ]
    }


def _completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets, position = [], offset
    for lp in items:
        offsets.append(position)
        position += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{t: p for _, t, p in lp.top} for lp in items],
        "text_offset": offsets,
    }


class ChatFormat:
    object_name = "chat.completion"

    def __init__(
        self, request_id: str, model: str, want_logprobs: bool, tools: ToolPlan | None = None
    ) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.want_logprobs = want_logprobs
        self.tools = tools  # replies may be tool calls (server/tools.py)
        self._streams: dict[int, CallStream] = {}  # per choice, when streamed with tools

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        return [
            {
                **self._head("chat.completion.chunk"),
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            for i in range(n)
        ]

    def chunk(self, index: int, out: GenerationOutput) -> dict[str, Any] | None:
        text, calls, called = out.text, [], False
        if self.tools is not None:
            stream = self._streams.setdefault(index, CallStream(self.tools))
            text, calls = stream.add(out.text)
            if out.finish_reason is not None:
                text += stream.leftover()
            called = stream.sent > 0
        if not text and not calls and out.finish_reason is None:
            return None
        delta: dict[str, Any] = {"content": text} if text else {}
        if calls:
            delta["tool_calls"] = calls
        logprobs = _chat_logprobs(out.logprobs) if self.want_logprobs and out.logprobs else None
        finish = _finish_reason(out.finish_reason, called)
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            **self._head("chat.completion.chunk"),
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def response(
        self, choices: list[ChoiceResult], prompt_tokens: int, _prompts: list[str]
    ) -> dict[str, Any]:
        return {
            **self._head(self.object_name),
            "choices": [self._choice(i, c) for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
        }

    def _choice(self, index: int, choice: ChoiceResult) -> dict[str, Any]:
        text = "".join(choice.text)
        content, calls = split_reply(self.tools, text) if self.tools is not None else (text, [])
        # A reply of calls has content null, as OpenAI's has.
        message: dict[str, Any] = {"role": "assistant", "content": (content or None) if calls else content}
        message["refusal"] = None
        if calls:
            message["tool_calls"] = calls
        return {
            "index": index,
            "message": message,
            "logprobs": _chat_logprobs(choice.logprobs) if self.want_logprobs else None,
            "finish_reason": _finish_reason(choice.finish_reason, bool(calls)),
        }


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """The API's finish reason: an aborted choice reads "stop"; a reply of tool calls that ended
    by itself, "tool_calls"."""
    if reason is None:
        return None
    if reason == "abort":
        return "stop"
    return "tool_calls" if called and reason == "stop" else reason


class CompletionFormat:
    object_name = "text_completion"

    def __init__(
        self, request_id: str, model: str, want_logprobs: bool, echo_texts: list[str] | None
    ) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.want_logprobs = want_logprobs
        self.echo_texts = echo_texts  # per choice, the prompt text to prepend

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def first_chunks(self, n: int) -> list[dict[str, Any]]:
        if not self.echo_texts:
            return []
        return [
            {**self._head(), "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": None}]}
            for i, t in enumerate(self.echo_texts)
        ]

    def chunk(self, index: int, out: GenerationOutput) -> dict[str, Any] | None:
        if not out.text and out.finish_reason is None:
            return None
        logprobs = _completion_logprobs(out.logprobs, 0) if self.want_logprobs and out.logprobs else None
        finish = (
            None
            if out.finish_reason is None
            else ("stop" if out.finish_reason == "abort" else out.finish_reason)
        )
        return {
            **self._head(),
            "choices": [{"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": finish}],
        }

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._head(), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def response(
        self, choices: list[ChoiceResult], prompt_tokens: int, _prompts: list[str]
    ) -> dict[str, Any]:
        out = []
        for i, c in enumerate(choices):
            prefix = self.echo_texts[i] if self.echo_texts else ""
            logprobs = _completion_logprobs(c.logprobs, len(prefix)) if self.want_logprobs else None
            out.append(
                {
                    "index": i,
                    "text": prefix + "".join(c.text),
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                }
            )
        return {
            **self._head(),
            "choices": out,
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
        }
