"""The contract between a model server and a text-generation engine.

A model server only talks to an engine through `Engine`: it turns an OpenAI request into
token ids and `SamplingParams`, then iterates `Engine.generate` for incremental outputs.
Engines batch concurrent `generate` calls together; none serializes requests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from budrt.engine.grammar import CompiledGrammar, Grammar, GrammarError

FinishReason = Literal["stop", "length", "abort"]


class EngineOverloaded(Exception):
    """The waiting queue is full; the server answers 503 with Retry-After."""


class EngineDead(Exception):
    """The engine's step loop has stopped; the request cannot complete."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token; None = no logprobs
    logit_bias: dict[int, float] | None = None
    grammar: CompiledGrammar | None = None  # constrains the output (`Engine.compile_grammar`)


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token, logprob)


@dataclass
class GenerationOutput:
    """One increment of one request's generation.

    `text` holds only newly completed characters (never a broken UTF-8 sequence, never any
    part of a matched stop string). The last increment has `finish_reason` set.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


class Tokenizer(ABC):
    """What a model server needs from a model's tokenizer."""

    eos_token_ids: list[int]
    # The most characters one token spells: a text longer than tokens x this cannot fit in that
    # many tokens, which the server checks before spending CPU on tokenizing it.
    max_token_chars: int = 64

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    @abstractmethod
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render chat messages (`{"role", "content"}`) to the prompt text the model expects."""


class Engine(ABC):
    """A text-generation engine serving one model."""

    model_name: str
    tokenizer: Tokenizer
    max_model_len: int
    runtime: dict[str, Any]  # how it runs (dtype, kernel level, and why): `budrt status` shows it

    @abstractmethod
    async def start(self) -> None:
        """Start the step loop (loads nothing; the model is loaded by the constructor/factory)."""

    @abstractmethod
    async def stop(self) -> None:
        """Finish or abort in-flight requests and stop the step loop."""

    @abstractmethod
    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationOutput]:
        """Queue a request and yield its outputs as they are produced.

        Raises `EngineOverloaded` (before yielding anything) when the waiting queue is full.
        Closing the iterator early (client gone) aborts the request and frees its resources.
        """

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request; its blocks/slots are freed within one step."""

    @abstractmethod
    def stats(self) -> dict[str, float]:
        """Live numbers for metrics and autoscaling: running, waiting, kv_usage, ..."""

    def is_healthy(self) -> bool:
        return True

    def compile_grammar(self, grammar: Grammar) -> CompiledGrammar:
        """Compile a grammar for `SamplingParams.grammar` (slow: call it in a worker thread).
        Raises `GrammarError` for a grammar that cannot be compiled."""
        raise GrammarError(f"model {self.model_name!r} cannot constrain its output")
