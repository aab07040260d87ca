"""`POST /v1/chat/completions` and `POST /v1/completions` on a model server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from budrt.engine.interface import Engine, EngineDead, EngineOverloaded, GenerationOutput, SamplingParams
from budrt.observe.tracing import RequestTrace, current_trace
from budrt.protocol.errors import (
    APIError,
    context_too_long,
    from_validation_error,
    invalid_request,
    overloaded,
    parse_json_body,
)
from budrt.protocol.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from budrt.server import metrics
from budrt.server.constraints import compile_output_grammar, output_grammar
from budrt.server.formatting import SSE_DONE, ChatFormat, ChoiceResult, CompletionFormat, sse
from budrt.server.generation import (
    check_max_tokens,
    check_n,
    check_queue_room,
    check_text_fits,
    check_token_ids,
    merge_choices,
    resolve_max_tokens,
    sampling_params,
    vocab_size,
    wait_for_disconnect,
)
from budrt.server.model_pool import HostedModel
from budrt.server.tools import ToolPlan, chat_messages

Format = ChatFormat | CompletionFormat
RequestModel = TypeVar("RequestModel", bound=BaseModel)


async def validate(request: Request, schema: type[RequestModel]) -> RequestModel:
    body = parse_json_body(await request.body())
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def serving_model(request: Request, name: str, task: str) -> HostedModel:
    """The model, loaded on demand and held until the response ends (see `app.holding_model`).
    A traced request that waited for the model's load has a `model.load` span."""
    pool = request.app.state.pool
    trace = current_trace()
    known = pool.get(name) if trace is not None else None
    waited = known is not None and known.state != "ready"
    started = time.time_ns()
    hosted = await pool.acquire(name, task)
    request.state.hosted = hosted
    if trace is not None:
        trace.set("budrt.model", hosted.name)
        if waited:
            trace.record("model.load", started, time.time_ns(), {"budrt.model": hosted.name})
    return hosted


async def chat_completions(request: Request) -> Response:
    req = await validate(request, ChatCompletionRequest)
    check_n(req.n, request.app.state.max_n)
    hosted = await serving_model(request, req.model, "chat")
    engine = hosted.engine
    assert engine is not None
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    check_queue_room(req.n, hosted.config.max_waiting, "n")
    check_max_tokens(req.output_limit(), engine.max_model_len, limit_param)
    check_logit_bias(req, engine)
    tools = ToolPlan.of(req)
    wanted = output_grammar(req, tools)
    try:
        messages = chat_messages(req, tools)
    except ValueError as exc:
        raise invalid_request(str(exc), param="messages") from None
    prompt_ids = await asyncio.to_thread(_chat_prompt, engine, messages)  # big prompts: off the loop
    grammar = await compile_output_grammar(engine, wanted)
    max_tokens = resolve_max_tokens(
        req.output_limit(),
        len(prompt_ids),
        engine.max_model_len,
        hosted.config.default_max_tokens,
        "messages",
    )
    top = (req.top_logprobs or 0) if req.logprobs else None
    jobs = [(prompt_ids, sampling_params(req, max_tokens, top, i, grammar)) for i in range(req.n)]
    fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", req.model, req.logprobs, tools)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await respond(
        request, engine, hosted.config.name, fmt, jobs, len(prompt_ids), req.stream, include_usage
    )


def _chat_prompt(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    """Render the chat template and tokenize (in a worker thread), refusing unseen what cannot fit."""
    chars = engine.tokenizer.max_token_chars
    check_text_fits(sum(len(m["content"]) for m in messages), chars, engine.max_model_len, "messages")
    try:
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # template errors (e.g. roles out of order) are the client's to fix
        raise invalid_request(
            f"The messages cannot be formatted for this model: {exc}", param="messages"
        ) from None
    check_text_fits(len(prompt), chars, engine.max_model_len, "messages")
    return engine.tokenizer.encode(prompt, add_special_tokens=False)


def check_logit_bias(req: SamplingFields, engine: Engine) -> None:
    if req.logit_bias:
        check_token_ids([int(k) for k in req.logit_bias], vocab_size(engine), "logit_bias")


async def completions(request: Request) -> Response:
    req = await validate(request, CompletionRequest)
    check_n(req.n, request.app.state.max_n)
    hosted = await serving_model(request, req.model, "chat")
    engine = hosted.engine
    assert engine is not None
    if req.best_of is not None and req.best_of != req.n:
        raise invalid_request("best_of different from n is not supported.", param="best_of")
    prompts = req.prompts()
    check_queue_room(len(prompts) * req.n, hosted.config.max_waiting, "prompt")
    check_max_tokens(req.max_tokens, engine.max_model_len, "max_tokens")
    check_logit_bias(req, engine)
    wanted = output_grammar(req, None)
    encoded = await asyncio.to_thread(_completion_prompts, engine, prompts, req.echo)  # off the loop
    grammar = await compile_output_grammar(engine, wanted)
    jobs: list[tuple[list[int], SamplingParams]] = []
    echo_texts: list[str] = []
    prompt_tokens = 0
    for ids, text in encoded:
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), engine.max_model_len, None, "prompt")
        prompt_tokens += len(ids)
        for _ in range(req.n):
            jobs.append((ids, sampling_params(req, max_tokens, req.logprobs, len(jobs), grammar)))
            echo_texts.append(text)
    fmt = CompletionFormat(
        f"cmpl-{uuid.uuid4().hex}", req.model, req.logprobs is not None, echo_texts if req.echo else None
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return await respond(
        request, engine, hosted.config.name, fmt, jobs, prompt_tokens, req.stream, include_usage
    )


def _completion_prompts(
    engine: Engine, prompts: list[str | list[int]], echo: bool
) -> list[tuple[list[int], str]]:
    """Each prompt's token ids and (for `echo`) text; what cannot fit is refused before any work."""
    for prompt in prompts:
        if isinstance(prompt, str):
            check_text_fits(len(prompt), engine.tokenizer.max_token_chars, engine.max_model_len, "prompt")
        elif len(prompt) >= engine.max_model_len:
            raise context_too_long(len(prompt), 0, engine.max_model_len, "prompt")
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids, text = engine.tokenizer.encode(prompt, add_special_tokens=True), prompt
        else:
            check_token_ids(prompt, vocab_size(engine), "prompt")
            ids = prompt
            text = engine.tokenizer.decode(prompt, skip_special_tokens=False) if echo else ""
        if not ids:
            raise invalid_request("The prompt is empty.", param="prompt")
        out.append((ids, text))
    return out


Outputs = AsyncGenerator[tuple[int, GenerationOutput], None]


@dataclass(slots=True)
class Generation:
    """One request's generation: the engine's outputs (merged over its jobs) and the choices
    they fill, for the JSON answer or the SSE stream."""

    model_name: str
    fmt: Format
    outputs: Outputs  # closing it aborts every unfinished job
    first: tuple[int, GenerationOutput] | None  # awaited already (None: no job generates)
    index_of: list[int]  # the choice of each generating job (jobs with max_tokens 0 generate nothing)
    choices: list[ChoiceResult]
    prompt_tokens: int
    started: float  # perf_counter at the request's start
    spans: GenerationSpans | None = None  # when the request is traced

    async def events(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """(choice index, output) as they come, the first one included."""
        if self.first is not None:
            yield self.index_of[self.first[0]], self.first[1]
            async for k, out in self.outputs:
                if self.spans is not None:
                    self.spans.output(k)
                yield self.index_of[k], out

    async def collect(self) -> None:
        async for index, out in self.events():
            self.choices[index].add(out)

    def finish(self) -> None:
        """The request's metrics, once it completed."""
        name = self.model_name
        metrics.E2E.labels(name).observe(time.perf_counter() - self.started)
        metrics.PROMPT_TOKENS.labels(name).inc(self.prompt_tokens)
        metrics.GENERATION_TOKENS.labels(name).inc(sum(c.completion_tokens for c in self.choices))
        for c in self.choices:
            metrics.REQUESTS.labels(name, c.finish_reason or "abort").inc()

    def end_spans(self) -> None:
        """Its spans, once it is over (completed or not)."""
        if self.spans is not None:
            self.spans.finish(sum(c.completion_tokens for c in self.choices))
            self.spans = None


class GenerationSpans:
    """The `queue`, `prefill` and `decode` spans of one traced generation, told from when the
    engine's outputs arrived: the engine reports no schedule of its own per request.

    The first token ends prefill, the last one ends decode. An engine that was idle when the
    request came took it at once: no queue. On a busy engine the prefill is taken as the last
    steps before the first token (as many as the prompt's chunks of `max_num_batched_tokens`),
    each as long as the request's first decode step (the gap to its second token), and the time
    before as queue; those two spans say `budrt.estimated`.
    """

    __slots__ = ("trace", "idle", "chunks", "submitted", "first", "job", "second", "last")

    def __init__(self, trace: RequestTrace, engine: Engine, prompt_len: int, step_tokens: int) -> None:
        self.trace = trace
        stats = engine.stats()
        self.idle = not stats.get("running") and not stats.get("waiting")
        self.chunks = -(-prompt_len // max(1, step_tokens))
        self.submitted = time.time_ns()
        self.first = self.second = self.last = 0
        self.job = -1  # the job of the first output, whose second output times a decode step

    def output(self, job: int) -> None:
        now = time.time_ns()
        if not self.first:
            self.first, self.job = now, job
        elif not self.second and job == self.job:
            self.second = now
        self.last = now

    def finish(self, completion_tokens: int, failed: bool = False) -> None:
        if not self.first:  # it ended before its first token: it never left the queue
            self.trace.record("queue", self.submitted, time.time_ns(), failed=failed)
            return
        prefill = self.submitted
        estimated = not self.idle
        if estimated and self.second:
            prefill = max(self.submitted, self.first - (self.second - self.first) * self.chunks)
        guess = {"budrt.estimated": estimated}
        self.trace.record("queue", self.submitted, prefill, guess)
        self.trace.record("prefill", prefill, self.first, guess)
        self.trace.record("decode", self.first, self.last, {"budrt.completion_tokens": completion_tokens})


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
    spans = _spans(request, engine, [ids for _, (ids, _) in live])
    outputs = merge_choices(engine, fmt.id, [job for _, job in live])
    try:
        first = await first_output(outputs, model_name, started) if live else None
    except BaseException:
        if spans is not None:  # refused (a full queue, an engine restarting) or the client left
            spans.finish(0, failed=True)
        raise
    if spans is not None and first is not None:
        spans.output(first[0])
    choices = [ChoiceResult() for _ in jobs]
    for choice, (_, params) in zip(choices, jobs, strict=True):
        if params.max_tokens == 0:
            choice.finish_reason = "length"
    index_of = [i for i, _ in live]
    gen = Generation(model_name, fmt, outputs, first, index_of, choices, prompt_tokens, started, spans)
    if stream:
        return StreamingResponse(
            sse_stream(gen, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await json_response(request, gen)


def _spans(request: Request, engine: Engine, prompts: list[list[int]]) -> GenerationSpans | None:
    """The spans of a generation about to be submitted, when its request is traced."""
    trace = current_trace()
    if trace is None or not prompts:
        return None
    step_tokens = request.state.hosted.config.max_num_batched_tokens
    return GenerationSpans(trace, engine, max(len(ids) for ids in prompts), step_tokens)


async def first_output(outputs: Outputs, model_name: str, started: float) -> tuple[int, GenerationOutput]:
    """The first output, awaited before any byte is sent: an overloaded or restarting engine is a
    503 now, not after a 200."""
    try:
        first = await anext(outputs)
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
    return first


async def json_response(request: Request, gen: Generation) -> Response:
    """The whole answer as one JSON body; a client that hangs up first aborts the generation (499)."""
    collector = asyncio.create_task(gen.collect())
    hangup = asyncio.create_task(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({collector, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        if not collector.done():  # the client left: abort the generation
            collector.cancel()
            # Let the cancel run through `outputs` first: closing it while the collector is still
            # inside it raises "aclose(): asynchronous generator is already running".
            await asyncio.gather(collector, return_exceptions=True)
            await gen.outputs.aclose()
    gen.end_spans()
    if collector.cancelled():
        return Response(status_code=499)
    collector.result()
    gen.finish()
    body = gen.fmt.response(gen.choices, gen.prompt_tokens, [])
    return Response(orjson.dumps(body), media_type="application/json")


async def sse_stream(gen: Generation, include_usage: bool) -> AsyncIterator[bytes]:
    """The answer as SSE chunks; a failure mid-stream is an error event, then the stream ends."""
    fmt, choices = gen.fmt, gen.choices
    extra = {"usage": None} if include_usage else {}
    try:
        for chunk in fmt.first_chunks(len(choices)):
            yield sse({**chunk, **extra})
        async for index, out in gen.events():
            choices[index].add(out)
            chunk = fmt.chunk(index, out)
            if chunk is not None:
                yield sse({**chunk, **extra})
        for i, c in enumerate(choices):  # choices that never ran (max_tokens=0) still finish
            if c.finish_reason == "length" and c.completion_tokens == 0 and not c.text:
                yield sse({**fmt.chunk(i, _empty_finish(i, gen.prompt_tokens)), **extra})  # type: ignore[dict-item]
        if include_usage:
            yield sse(fmt.usage_chunk(gen.prompt_tokens, sum(c.completion_tokens for c in choices)))
        gen.finish()
        yield SSE_DONE
    except Exception as exc:  # mid-stream failure: tell the client in-band, then end the stream
        error = (
            exc if isinstance(exc, APIError) else APIError(500, "Generation failed.", code="internal_error")
        )
        yield sse(error.body())
        yield SSE_DONE
    finally:
        gen.end_spans()
        await gen.outputs.aclose()


def _empty_finish(index: int, prompt_tokens: int) -> GenerationOutput:
    return GenerationOutput(f"{index}", "", [], "length", prompt_tokens, 0)
