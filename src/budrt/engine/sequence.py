"""One request's state inside the engine, and turning each new token into a `GenerationOutput`."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from budrt.engine.detokenizer import IncrementalDetokenizer
from budrt.engine.grammar import GrammarMatcher
from budrt.engine.interface import FinishReason, GenerationOutput, SamplingParams, Tokenizer, TokenLogprob

# Where a sequence's outputs go: a GenerationOutput, or an exception that fails the request.
Sink = Callable[[GenerationOutput | BaseException], None]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens capped so prompt + output fits max_model_len
    detokenizer: IncrementalDetokenizer
    sink: Sink
    eos_token_ids: frozenset[int]
    output_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # prompt + output, set in __post_init__
    status: SequenceStatus = SequenceStatus.WAITING
    # Paged KV cache: the blocks holding this sequence's entries, how many leading tokens have
    # entries written (the rest are computed in the next prefill chunks), how many came from the
    # prefix cache, and how many full blocks were already offered to the prefix cache.
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_sealed_blocks: int = 0
    finish_reason: FinishReason | None = None
    # Seeded requests draw from their own generator, so their samples do not depend on what else
    # shares the batch.
    generator: torch.Generator | None = None
    # Where the output stands in its grammar, when one constrains it (`engine.grammar`), and
    # whether tokens the grammar forces are appended without sampling (jump-forward: not when
    # logprobs are wanted, as a forced token has no distribution).
    grammar: GrammarMatcher | None = None
    jump_forward: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> GenerationOutput:
        """Record a sampled token, decide whether the sequence is done, and build its output."""
        if self.grammar is not None:
            self.grammar.consume(token_id)  # ValueError (the request fails) if it left the grammar
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
        is_stop_token = token_id in self.params.stop_token_ids or (
            not self.params.ignore_eos and token_id in self.eos_token_ids
        )
        if is_stop_token:
            # The stop token counts as generated but adds no text (like vLLM's default).
            self.finish_reason = "stop"
        else:
            self.detokenizer.add_token(token_id)
            if self.detokenizer.stopped or (self.grammar is not None and self.grammar.is_stopped):
                self.finish_reason = "stop"
            elif len(self.output_token_ids) >= self.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None:
            self.detokenizer.flush()
        return GenerationOutput(
            request_id=self.request_id,
            text=self.detokenizer.take(final=self.finish_reason is not None),
            token_ids=[token_id],
            finish_reason=self.finish_reason,
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=len(self.output_token_ids),
            logprobs=[logprob] if logprob is not None else None,
        )

    def forced_tokens(self) -> list[int]:
        """Tokens to append without a forward pass each (jump-forward), within `max_tokens`."""
        if not self.jump_forward or self.grammar is None:
            return []
        return self.grammar.forced()[: self.max_tokens - len(self.output_token_ids)]

    def abort_output(self) -> GenerationOutput:
        self.finish_reason = "abort"
        self.detokenizer.flush()
        return GenerationOutput(
            request_id=self.request_id,
            text=self.detokenizer.take(final=True),
            token_ids=[],
            finish_reason="abort",
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=len(self.output_token_ids),
        )


def make_sequence(
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
    tokenizer: Tokenizer,
    max_model_len: int,
    vocab_size: int,
    sink: Sink,
    jump_forward: bool = False,
) -> Sequence:
    """Validate a request and build its sequence (raises ValueError for requests that cannot run).
    `jump_forward`: the engine's setting (`ModelConfig.jump_forward`)."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(
            f"the prompt has {len(prompt_token_ids)} tokens; this model's context is {max_model_len} tokens"
        )
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    bias_ids = list((params.logit_bias or {}).keys())
    if bias_ids and (min(bias_ids) < 0 or max(bias_ids) >= vocab_size):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
    if params.max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if params.temperature < 0:
        raise ValueError("temperature must be >= 0")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    if params.repetition_penalty <= 0:
        raise ValueError("repetition_penalty must be > 0")
    _check_step_safe(params)
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    return Sequence(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        params=params,
        max_tokens=min(params.max_tokens, max_model_len - len(prompt_token_ids)),
        detokenizer=IncrementalDetokenizer(tokenizer, params.stop),
        sink=sink,
        eos_token_ids=frozenset(tokenizer.eos_token_ids),
        generator=generator,
        grammar=params.grammar.matcher() if params.grammar is not None else None,
        jump_forward=jump_forward and params.grammar is not None and params.logprobs is None,
    )


def _check_step_safe(params: SamplingParams) -> None:
    """Values the sampler cannot take would fail the whole engine step, and so every request
    sharing it: refuse them here, for this request alone."""
    numbers = (params.temperature, params.top_p, params.min_p, params.repetition_penalty)
    numbers += (params.presence_penalty, params.frequency_penalty, *(params.logit_bias or {}).values())
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError("sampling parameters must be finite numbers")
    if not -1 <= params.top_k < 2**63:
        raise ValueError("top_k must be -1 (off) or a positive number of tokens")
    if params.seed is not None and not 0 <= params.seed < 2**64:
        raise ValueError("seed must be in [0, 2**64)")
    if params.logprobs is not None and not 0 <= params.logprobs <= 20:
        raise ValueError("logprobs must be in [0, 20]")
