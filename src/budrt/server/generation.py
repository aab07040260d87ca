"""From a validated OpenAI request to engine calls: limits, sampling parameters, fan-out of `n`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from budrt.engine.grammar import CompiledGrammar
from budrt.engine.interface import Engine, GenerationOutput, SamplingParams
from budrt.protocol.errors import APIError, context_too_long, invalid_request
from budrt.protocol.schemas import MAX_SEED, SamplingFields

_DONE = object()

# A normalizer (NFKC, lowercasing...) may fold several characters into what one vocabulary entry
# spells, so a text is refused unseen only beyond twice the most it could spell.
_CHARS_SLACK = 2


def check_text_fits(chars: int, max_token_chars: int, max_tokens: int, param: str) -> None:
    """400 for a text too long for `max_tokens` tokens, told from its length alone: no CPU is
    spent tokenizing (or rendering) what can never fit."""
    if chars > max_tokens * max_token_chars * _CHARS_SLACK:
        raise APIError(
            400,
            f"The input has {chars} characters, far more than this model's context of {max_tokens} "
            "tokens can hold. Please reduce its length.",
            param=param,
            code="context_length_exceeded",
        )


def check_max_tokens(requested: int | None, max_model_len: int, param: str) -> None:
    """`max_tokens` beyond the whole context can never be served (checked before any work)."""
    if requested is not None and requested > max_model_len:
        raise invalid_request(
            f"'{param}' is {requested}; this model's context is {max_model_len} tokens.",
            param=param,
            code="invalid_value",
        )


def check_n(n: int, max_n: int) -> None:
    if n > max_n:
        raise invalid_request(
            f"'n' is {n}; this server allows at most {max_n}.", param="n", code="invalid_value"
        )


def check_queue_room(count: int, max_waiting: int, param: str) -> None:
    """A request whose sequences could never all wait in the engine's queue is refused (a 503
    would tell the client to retry what cannot succeed)."""
    if count > max_waiting:
        raise invalid_request(
            f"The request asks for {count} sequences (prompts x n); this model queues at most {max_waiting}.",
            param=param,
        )


def resolve_max_tokens(
    requested: int | None, prompt_tokens: int, max_model_len: int, default: int | None, param: str
) -> int:
    """The output budget, or a 400 when prompt + requested output cannot fit the context."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise context_too_long(prompt_tokens, requested or 0, max_model_len, param)
    if requested is None:
        return min(room, default) if default else room
    if requested > room:
        raise context_too_long(prompt_tokens, requested, max_model_len, param)
    return requested


def sampling_params(
    req: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    choice: int,
    grammar: CompiledGrammar | None = None,
) -> SamplingParams:
    bias: dict[int, float] | None = None
    if req.logit_bias:  # keys are decimal digits (schemas), in the vocabulary (check_token_ids)
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}
    # n choices differ, reproducibly; still within the generator's range.
    seed = (req.seed + choice) % (MAX_SEED + 1) if req.seed is not None else None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=seed,
        stop=req.stop_list(),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        logit_bias=bias,
        grammar=grammar,
    )


def vocab_size(engine: Engine) -> int | None:
    """Token ids a request may name: within both the tokenizer's and the model's vocabulary."""
    sizes = [getattr(x, "vocab_size", None) for x in (engine, engine.tokenizer)]
    known = [s for s in sizes if isinstance(s, int)]
    return min(known) if known else None


def check_token_ids(ids: list[int], vocab_size: int | None, param: str) -> None:
    if vocab_size is None or not ids:
        return
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        token = low if low < 0 else high
        raise APIError(
            400, f"Token id {token} is out of range for this model (0 to {vocab_size - 1}).", param=param
        )


async def merge_choices(
    engine: Engine, request_id: str, jobs: list[tuple[list[int], SamplingParams]]
) -> AsyncGenerator[tuple[int, GenerationOutput], None]:
    """Run every (prompt, params) job at once and yield (choice index, output) as they come.

    The first item is awaited by callers before any byte is sent, so an overloaded engine
    still becomes a clean 503. Closing this iterator aborts every unfinished job.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(index: int, prompt: list[int], params: SamplingParams) -> None:
        try:
            async for out in engine.generate(f"{request_id}-{index}", prompt, params):
                queue.put_nowait((index, out))
        except Exception as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(i, p, sp)) for i, (p, sp) in enumerate(jobs)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_disconnect(receive: Any) -> None:
    """Return when the client hangs up (the body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
