"""`POST /v1/embeddings` on a model server."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from budrt.engine.interface import EngineOverloaded
from budrt.protocol.errors import APIError, invalid_request, overloaded
from budrt.protocol.schemas import EmbeddingRequest
from budrt.server import metrics
from budrt.server.embeddings import EmbeddingModel, InputTooLong
from budrt.server.generation import check_text_fits
from budrt.server.text_routes import serving_model, validate


async def embeddings(request: Request) -> Response:
    req = await validate(request, EmbeddingRequest)
    hosted = await serving_model(request, req.model, "embedding")
    batcher = hosted.embedder
    assert batcher is not None
    model = batcher.model
    if req.dimensions is not None and req.dimensions != model.dimensions:
        raise invalid_request(
            f"This model produces {model.dimensions}-dimensional embeddings and cannot change them; "
            f"'dimensions' must be omitted or {model.dimensions}.",
            param="dimensions",
        )
    inputs = await _token_ids(req.input, model)
    try:
        vectors = await batcher.embed(inputs)
    except InputTooLong as exc:
        raise APIError(
            400, f"{exc}. Shorten the input.", param="input", code="context_length_exceeded"
        ) from None
    except EngineOverloaded:
        raise overloaded(retry_after=1) from None
    metrics.EMBEDDING_INPUTS.labels(hosted.config.name).inc(len(inputs))
    array = vectors.numpy().astype(np.float32)
    data = []
    for i, row in enumerate(array):
        embedding: object = (
            base64.b64encode(row.tobytes()).decode() if req.encoding_format == "base64" else row.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = sum(len(ids) for ids in inputs)
    body = {
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Response(orjson.dumps(body), media_type="application/json")


async def _token_ids(
    raw: str | list[str] | list[int] | list[list[int]], model: EmbeddingModel
) -> list[list[int]]:
    """Each input's token ids; texts that cannot fit are refused unseen, the rest tokenized off the loop."""
    if isinstance(raw, str) or all(isinstance(x, str) for x in raw):
        texts: list[str] = [raw] if isinstance(raw, str) else list(raw)  # type: ignore[list-item]
        if any(x == "" for x in texts):
            raise invalid_request("input must not contain empty strings.", param="input")
        for text in texts:  # (WordPiece drops whitespace, so it does not count)
            visible = len(text) - sum(map(text.count, " \t\n\r"))
            check_text_fits(visible, model.max_token_chars, model.max_tokens, "input")
        inputs = await asyncio.to_thread(model.tokenize, texts)
    elif all(isinstance(x, int) for x in raw):
        inputs = [model.wrap_ids(list(raw))]  # type: ignore[arg-type]
    else:
        if any(not x for x in raw):
            raise invalid_request("input must not contain empty token lists.", param="input")
        inputs = [model.wrap_ids(list(x)) for x in raw]  # type: ignore[arg-type]
    vocab = model.tokenizer.get_vocab_size()
    for ids in inputs:
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise invalid_request("input holds an empty item or a token id out of range.", param="input")
    return inputs
