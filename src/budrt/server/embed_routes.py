"""`POST /v1/embeddings` on a model server."""

from __future__ import annotations

import base64

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from budrt.protocol.errors import APIError, invalid_request
from budrt.protocol.schemas import EmbeddingRequest
from budrt.server import metrics
from budrt.server.embeddings import InputTooLong
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
    raw = req.input
    if isinstance(raw, str):
        inputs = model.tokenize([raw])
    elif all(isinstance(x, str) for x in raw):
        if any(x == "" for x in raw):
            raise invalid_request("input must not contain empty strings.", param="input")
        inputs = model.tokenize(list(raw))  # type: ignore[arg-type]
    elif all(isinstance(x, int) for x in raw):
        inputs = [model.wrap_ids(list(raw))]  # type: ignore[arg-type]
    else:
        inputs = [model.wrap_ids(list(x)) for x in raw]  # type: ignore[arg-type]
    vocab = model.tokenizer.get_vocab_size()
    for ids in inputs:
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise invalid_request("input holds an empty item or a token id out of range.", param="input")
    try:
        vectors = await batcher.embed(inputs)
    except InputTooLong as exc:
        raise APIError(
            400, f"{exc}. Shorten the input.", param="input", code="context_length_exceeded"
        ) from None
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
