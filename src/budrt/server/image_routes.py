"""`POST /v1/images/generations` and `/v1/images/edits` on a model server: plan, queue a job
per image, encode.

The pictures come back as `b64_json`: URLs are the gateway's business (it stores the bytes in
the object store and signs a link), so a model server keeps no files.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import torch
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from budrt.engine import openmp
from budrt.engine.interface import EngineOverloaded
from budrt.image import preprocess
from budrt.image.edit import make_start, read_mask
from budrt.image.encode import decode_picture, encode_picture
from budrt.image.engine import DiffusionEngine, ImageJob, Start
from budrt.image.preprocess import ImagePlan
from budrt.observe.tracing import Attributes, RequestTrace, current_trace
from budrt.protocol.errors import from_validation_error, invalid_request, overloaded
from budrt.protocol.schemas import ImageEditRequest, ImageGenerationRequest
from budrt.server import metrics
from budrt.server.generation import check_n, check_queue_room, wait_for_disconnect
from budrt.server.text_routes import serving_model, validate


async def image_generations(request: Request) -> Response:
    req = await validate(request, ImageGenerationRequest)
    engine, plan = await _planned(request, req)
    jobs = await openmp.to_thread(make_jobs, engine, plan, req.n, None)
    return await run_jobs(request, engine, jobs, plan, req)


async def _planned(request: Request, req: ImageGenerationRequest) -> tuple[DiffusionEngine, ImagePlan]:
    """The model's engine, held for this request, and the request's plan (400s before queueing)."""
    check_n(req.n, request.app.state.max_n)
    hosted = await serving_model(request, req.model, "image")
    engine = hosted.imager
    assert engine is not None
    check_queue_room(req.n, hosted.config.max_waiting, "n")
    return engine, preprocess.plan(req, hosted.config, engine.denoiser)


async def image_edits(request: Request) -> Response:
    """img2img (`image`, `strength`) and inpainting (plus `mask`), from the multipart form the SDK sends."""
    fields, files = await _read_form(request)
    try:
        req = ImageEditRequest.model_validate(fields, strict=False)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    engine, plan = await _planned(request, req)
    if "image" not in files:
        raise invalid_request("An input image is required.", param="image")
    size = (plan.width, plan.height)
    try:
        picture = await asyncio.to_thread(decode_picture, files["image"], size)
    except ValueError as exc:
        raise invalid_request(f"'image' is {exc}.", param="image") from None
    try:
        repaint = await asyncio.to_thread(read_mask, files["mask"], size) if "mask" in files else None
    except ValueError as exc:
        raise invalid_request(f"'mask' is {exc}.", param="mask") from None
    strength = req.strength if req.strength is not None else (1.0 if repaint is not None else 0.8)
    start = await openmp.to_thread(make_start, engine.denoiser, picture, repaint, strength, torch.Generator())
    jobs = await openmp.to_thread(make_jobs, engine, plan, req.n, start)
    return await run_jobs(request, engine, jobs, plan, req)


async def _read_form(request: Request) -> tuple[dict[str, str], dict[str, bytes]]:
    """The form's text fields and its files (`image`, `image[]`: the first; `mask`)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise invalid_request("Send the edit as multipart/form-data, as the OpenAI SDK does.")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    async with request.form(max_files=4, max_fields=64) as form:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(name, value)
            else:
                files.setdefault(name.removesuffix("[]"), await value.read())
    return fields, files


def make_jobs(engine: DiffusionEngine, plan: ImagePlan, n: int, start: Start | None) -> list[ImageJob]:
    """One job per image, its prompt states computed once for all of them (off the event loop)."""
    negatives = None if plan.negative_prompt is None else [plan.negative_prompt]
    cond, uncond = engine.denoiser.encode([plan.prompt], negatives)
    return [
        ImageJob(
            plan.height,
            plan.width,
            cond,
            uncond,
            plan.guidance,
            plan.steps,
            torch.Generator().manual_seed(seed),
            exact=plan.seeded,
            start=start,
        )
        for seed in plan.seeds
    ]


async def run_jobs(
    request: Request, engine: DiffusionEngine, jobs: list[ImageJob], plan: ImagePlan, req: Any
) -> Response:
    """Queue `jobs` and answer with their pictures, whole or streamed; a client that hangs up
    cancels them."""
    events: asyncio.Queue[dict[str, Any]] | None = None
    if req.stream:
        events = asyncio.Queue()
        loop = asyncio.get_running_loop()
        every = max(1, plan.steps // (req.partial_images + 1)) if req.partial_images else 0
        for index, job in enumerate(jobs):
            job.progress = _progress_to(loop, events, index)
            job.preview_every = every
        _watch(loop, events, jobs)
    trace, submitted = current_trace(), time.time_ns()
    try:
        engine.submit(jobs)
    except EngineOverloaded:
        metrics.REQUEST_ERRORS.labels(req.model, "503").inc()
        raise overloaded(retry_after=1) from None
    if events is not None:
        spans = (trace, submitted) if trace is not None else None
        return StreamingResponse(_stream(jobs, events, plan, req, spans), media_type="text/event-stream")
    started = time.perf_counter()
    pictures = await _collect(request, jobs)
    if trace is not None:
        trace.record(
            "denoise", submitted, time.time_ns(), _denoising(plan, len(jobs)), failed=pictures is None
        )
    metrics.REQUESTS.labels(req.model, "abort" if pictures is None else "stop").inc()
    if pictures is None:
        return Response(status_code=499)
    metrics.E2E.labels(req.model).observe(time.perf_counter() - started)
    encoding = time.time_ns()
    files = await asyncio.to_thread(_encode_all, pictures, req)
    if trace is not None:
        trace.record("encode", encoding, time.time_ns(), {"budrt.output_format": req.output_format})
    data = [_datum(f, plan) for f in files]
    body = {"created": int(time.time()), "data": data, **_shape(plan, req), "usage": _usage(plan, len(jobs))}
    return Response(orjson.dumps(body), media_type="application/json")


async def _collect(request: Request, jobs: list[ImageJob]) -> list[np.ndarray] | None:
    """The jobs' pictures; None (jobs cancelled) when the client hangs up first."""
    results = asyncio.gather(*(asyncio.wrap_future(j.result) for j in jobs))
    hangup = asyncio.create_task(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({results, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
    if not results.done():
        _cancel(jobs)
        results.cancel()
        await asyncio.gather(results, return_exceptions=True)
        return None
    return results.result()


def _cancel(jobs: list[ImageJob]) -> None:
    for job in jobs:
        job.cancelled = True


def _progress_to(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[dict[str, Any]], index: int) -> Any:
    """The engine thread's progress callback for image `index`, posting onto the event loop."""

    def progress(step: int, steps: int, preview: np.ndarray | None) -> None:
        event = {"image_index": index, "step": step, "steps": steps, "preview": preview}
        loop.call_soon_threadsafe(events.put_nowait, event)

    return progress


def _watch(
    loop: asyncio.AbstractEventLoop, events: asyncio.Queue[dict[str, Any]], jobs: list[ImageJob]
) -> None:
    """Each job's end (picture, error or cancel) is an event too, after its last progress."""
    for index, job in enumerate(jobs):
        job.result.add_done_callback(
            lambda _, i=index: loop.call_soon_threadsafe(events.put_nowait, {"image_index": i, "done": True})
        )


async def _stream(
    jobs: list[ImageJob],
    events: asyncio.Queue[dict[str, Any]],
    plan: ImagePlan,
    req: Any,
    spans: tuple[RequestTrace, int] | None = None,
) -> AsyncIterator[bytes]:
    """SSE: `image_generation.progress` each step, `image_generation.partial_image` with a preview
    every few steps, `image_generation.completed` per image (the last one carries `usage`).
    `spans`: the request's trace and when its jobs were submitted, for its `denoise` span (the
    pictures are encoded as each one is done, within it)."""
    shape = _shape(plan, req)
    partials = [0] * len(jobs)
    pending = len(jobs)
    try:
        while pending:
            event = await events.get()
            index = event["image_index"]
            if event.get("done"):
                pending -= 1
                picture = jobs[index].result.result()  # an engine error ends the stream here
                data = await asyncio.to_thread(
                    encode_picture, picture, req.output_format, req.output_compression
                )
                done = {"type": "image_generation.completed", "image_index": index, **_b64(data), **shape}
                if not pending:
                    done["usage"] = _usage(plan, len(jobs))
                yield _sse(done)
                continue
            progress = {"type": "image_generation.progress", "image_index": index}
            yield _sse({**progress, "step": event["step"], "steps": event["steps"]})
            if event["preview"] is not None:
                data = await asyncio.to_thread(encode_picture, event["preview"], req.output_format)
                partial = {"type": "image_generation.partial_image", "image_index": index}
                yield _sse({**partial, "partial_image_index": partials[index], **_b64(data), **shape})
                partials[index] += 1
    finally:
        _cancel(jobs)  # a no-op for finished jobs; a client gone mid-stream stops the rest
        if spans is not None:
            spans[0].record(
                "denoise", spans[1], time.time_ns(), _denoising(plan, len(jobs)), failed=pending > 0
            )


def _denoising(plan: ImagePlan, images: int) -> Attributes:
    """The attributes of a `denoise` span: one span for all the steps of all the images."""
    return {
        "budrt.images": images,
        "budrt.steps": plan.steps,
        "budrt.image_steps": images * plan.steps,
        "budrt.size": f"{plan.width}x{plan.height}",
    }


def _sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def _b64(data: bytes) -> dict[str, Any]:
    return {"b64_json": base64.b64encode(data).decode(), "created_at": int(time.time())}


def _encode_all(pictures: list[np.ndarray], req: Any) -> list[bytes]:
    return [encode_picture(p, req.output_format, req.output_compression) for p in pictures]


def _datum(data: bytes, plan: ImagePlan) -> dict[str, Any]:
    datum: dict[str, Any] = {"b64_json": base64.b64encode(data).decode()}
    if plan.revised_prompt is not None:
        datum["revised_prompt"] = plan.revised_prompt
    return datum


def _shape(plan: ImagePlan, req: Any) -> dict[str, Any]:
    return {
        "size": f"{plan.width}x{plan.height}",
        "quality": req.quality,
        "output_format": req.output_format,
        "background": "opaque",
    }


def _usage(plan: ImagePlan, images: int) -> dict[str, Any]:
    """OpenAI's image usage fields (the prompt's tokens read once per request; no image tokens),
    plus what budrt meters: images, pixels, denoising steps."""
    tokens = plan.prompt_tokens
    return {
        "input_tokens": tokens,
        "output_tokens": 0,
        "total_tokens": tokens,
        "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0},
        "images": images,
        "pixels": images * plan.width * plan.height,
        "steps": images * plan.steps,
    }
