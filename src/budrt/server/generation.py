"""From a validated OpenAI request to engine calls: limits, sampling parameters, fan-out of `n`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from budrt.engine.interface import Engine, GenerationOutput, SamplingParams
from budrt.protocol.errors import APIError, context_too_long
from budrt.protocol.schemas import SamplingFields

_DONE = object()


def resolve_max_tokens(
    requested: int | None, prompt_tokens: int, max_model_len: int, default: int | None
) -> int:
    """The output budget, or a 400 when prompt + requested output cannot fit the context."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise context_too_long(prompt_tokens, requested or 0, max_model_len)
    if requested is None:
        return min(room, default) if default else room
    if requested > room:
        raise context_too_long(prompt_tokens, requested, max_model_len)
    return requested


def sampling_params(
    req: SamplingFields, max_tokens: int, logprobs: int | None, choice: int
) -> SamplingParams:
    bias: dict[int, float] | None = None
    if req.logit_bias:
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}
    seed = req.seed + choice if req.seed is not None else None  # n choices differ, reproducibly
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
    )


def check_token_ids(ids: list[int], vocab_size: int | None, param: str) -> None:
    if vocab_size is None:
        return
    for token in ids:
        if not 0 <= token < vocab_size:
            raise APIError(400, f"Token id {token} is out of range for this model.", param=param)


async def merge_choices(
    engine: Engine, request_id: str, jobs: list[tuple[list[int], SamplingParams]]
) -> AsyncIterator[tuple[int, GenerationOutput]]:
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
