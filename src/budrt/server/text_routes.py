"""`POST /v1/chat/completions` and `POST /v1/completions` on a model server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from budrt.engine.interface import Engine, EngineDead, EngineOverloaded, GenerationOutput, SamplingParams
from budrt.protocol.errors import (
    APIError,
    from_validation_error,
    invalid_request,
    overloaded,
    parse_json_body,
)
from budrt.protocol.schemas import ChatCompletionRequest, CompletionRequest
from budrt.server import metrics
from budrt.server.formatting import SSE_DONE, ChatFormat, ChoiceResult, CompletionFormat, sse
from budrt.server.generation import (
    check_token_ids,
    merge_choices,
    resolve_max_tokens,
    sampling_params,
    wait_for_disconnect,
)
from budrt.server.registry import HostedModel

Format = ChatFormat | CompletionFormat
RequestModel = TypeVar("RequestModel", bound=BaseModel)


async def validate(request: Request, schema: type[RequestModel]) -> RequestModel:
    body = parse_json_body(await request.body())
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def serving_model(request: Request, name: str, task: str) -> HostedModel:
    """The model, loaded on demand and held until the response ends (see `app.holding_model`)."""
    hosted = await request.app.state.registry.acquire(name, task)
    request.state.hosted = hosted
    return hosted


async def chat_completions(request: Request) -> Response:
    req = await validate(request, ChatCompletionRequest)
    hosted = await serving_model(request, req.model, "chat")
    engine = hosted.engine
    assert engine is not None
    try:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
    except ValueError as exc:
        raise invalid_request(str(exc), param="messages") from None
    try:
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # template errors (e.g. roles out of order) are the client's to fix
        raise invalid_request(
            f"The messages cannot be formatted for this model: {exc}", param="messages"
        ) from None
    prompt_ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    max_tokens = resolve_max_tokens(
        req.output_limit(), len(prompt_ids), engine.max_model_len, hosted.config.default_max_tokens
    )
    top = (req.top_logprobs or 0) if req.logprobs else None
    jobs = [(prompt_ids, sampling_params(req, max_tokens, top, i)) for i in range(req.n)]
    fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", req.model, req.logprobs)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await respond(
        request, engine, hosted.config.name, fmt, jobs, len(prompt_ids), req.stream, include_usage
    )


async def completions(request: Request) -> Response:
    req = await validate(request, CompletionRequest)
    hosted = await serving_model(request, req.model, "chat")
    engine = hosted.engine
    assert engine is not None
    if req.best_of is not None and req.best_of != req.n:
        raise invalid_request("best_of different from n is not supported.", param="best_of")
    vocab = getattr(engine.tokenizer, "vocab_size", None)
    jobs: list[tuple[list[int], SamplingParams]] = []
    echo_texts: list[str] = []
    prompt_tokens = 0
    for prompt in req.prompts():
        if isinstance(prompt, str):
            ids = engine.tokenizer.encode(prompt, add_special_tokens=True)
            text = prompt
        else:
            check_token_ids(prompt, vocab, "prompt")
            ids, text = prompt, engine.tokenizer.decode(prompt, skip_special_tokens=False)
        if not ids:
            raise invalid_request("The prompt is empty.", param="prompt")
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), engine.max_model_len, None)
        prompt_tokens += len(ids)
        for _ in range(req.n):
            jobs.append((ids, sampling_params(req, max_tokens, req.logprobs, len(jobs))))
            echo_texts.append(text)
    fmt = CompletionFormat(
        f"cmpl-{uuid.uuid4().hex}", req.model, req.logprobs is not None, echo_texts if req.echo else None
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await respond(
        request, engine, hosted.config.name, fmt, jobs, prompt_tokens, req.stream, include_usage
    )


async def respond(
    request: Request,
    engine: Engine,
    model_name: str,
    fmt: Format,
    jobs: list[tuple[list[int], SamplingParams]],
    prompt_tokens: int,
    stream: bool,
    include_usage: bool,
) -> Response:
    started = time.perf_counter()
    live = [(i, job) for i, job in enumerate(jobs) if job[1].max_tokens > 0]
    outputs = merge_choices(engine, fmt.id, [job for _, job in live])
    first: tuple[int, GenerationOutput] | None = None
    if live:
        try:
            first = await anext(outputs)  # 503 now, not after a 200 has been sent
        except EngineOverloaded:
            metrics.REQUEST_ERRORS.labels(model_name, "503").inc()
            raise overloaded(retry_after=1) from None
        except EngineDead:
            metrics.REQUEST_ERRORS.labels(model_name, "503").inc()
            raise APIError(
                503,
                "The engine is restarting; retry shortly.",
                code="engine_unavailable",
                headers={"Retry-After": "2"},
            ) from None
        except ValueError as exc:  # the engine refused the request itself (e.g. bad token ids)
            metrics.REQUEST_ERRORS.labels(model_name, "400").inc()
            raise invalid_request(str(exc)) from None
        metrics.TTFT.labels(model_name).observe(time.perf_counter() - started)
    index_of = [i for i, _ in live]

    async def events() -> AsyncIterator[tuple[int, GenerationOutput]]:
        if first is not None:
            yield index_of[first[0]], first[1]
            async for k, out in outputs:
                yield index_of[k], out

    choices = [ChoiceResult() for _ in jobs]
    for i, (_, params) in enumerate(jobs):
        if params.max_tokens == 0:
            choices[i].finish_reason = "length"

    def finish() -> None:
        metrics.E2E.labels(model_name).observe(time.perf_counter() - started)
        metrics.PROMPT_TOKENS.labels(model_name).inc(prompt_tokens)
        metrics.GENERATION_TOKENS.labels(model_name).inc(sum(c.completion_tokens for c in choices))
        for c in choices:
            metrics.REQUESTS.labels(model_name, c.finish_reason or "abort").inc()

    if stream:
        return StreamingResponse(
            _sse_stream(fmt, events(), outputs, choices, prompt_tokens, include_usage, finish),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def collect() -> None:
        async for index, out in events():
            choices[index].add(out)

    collector = asyncio.create_task(collect())
    hangup = asyncio.create_task(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({collector, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not collector.done():  # the client left: abort the generation
            collector.cancel()
            await outputs.aclose()
    if collector.cancelled():
        return Response(status_code=499)
    collector.result()
    finish()
    body = fmt.response(choices, prompt_tokens, [])
    return Response(orjson.dumps(body), media_type="application/json")


async def _sse_stream(
    fmt: Format,
    events: AsyncIterator[tuple[int, GenerationOutput]],
    outputs: Any,
    choices: list[ChoiceResult],
    prompt_tokens: int,
    include_usage: bool,
    finish: Any,
) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}
    try:
        for chunk in fmt.first_chunks(len(choices)):
            yield sse({**chunk, **extra})
        async for index, out in events:
            choices[index].add(out)
            chunk = fmt.chunk(index, out)
            if chunk is not None:
                yield sse({**chunk, **extra})
        for i, c in enumerate(choices):  # choices that never ran (max_tokens=0) still finish
            if c.finish_reason == "length" and c.completion_tokens == 0 and not c.text:
                yield sse({**fmt.chunk(i, _empty_finish(i, prompt_tokens)), **extra})  # type: ignore[dict-item]
        if include_usage:
            yield sse(fmt.usage_chunk(prompt_tokens, sum(c.completion_tokens for c in choices)))
        finish()
        yield SSE_DONE
    except Exception as exc:  # mid-stream failure: tell the client in-band, then end the stream
        error = (
            exc if isinstance(exc, APIError) else APIError(500, "Generation failed.", code="internal_error")
        )
        yield sse(error.body())
        yield SSE_DONE
    finally:
        await outputs.aclose()


def _empty_finish(index: int, prompt_tokens: int) -> GenerationOutput:
    return GenerationOutput(f"{index}", "", [], "length", prompt_tokens, 0)
