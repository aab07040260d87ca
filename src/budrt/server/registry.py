"""The models one model server hosts, and their state (loading, ready, failed).

Models load in a background thread at start so `/health/live` answers at once and
`/health/ready` turns 200 only when every model can serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from budrt.config import ModelConfig
from budrt.engine.interface import Engine
from budrt.server.embeddings import EmbeddingBatcher, EmbeddingModel

log = logging.getLogger(__name__)
ModelState = Literal["loading", "ready", "failed"]


@dataclass
class HostedModel:
    config: ModelConfig
    state: ModelState = "loading"
    error: str | None = None
    engine: Engine | None = None
    embedder: EmbeddingBatcher | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class ModelRegistry:
    def __init__(self, configs: list[ModelConfig]) -> None:
        self.models: dict[str, HostedModel] = {}
        self.aliases: dict[str, str] = {}
        for cfg in configs:
            self.models[cfg.name] = HostedModel(cfg)
            for alias in cfg.aliases:
                self.aliases[alias] = cfg.name

    def get(self, name: str) -> HostedModel | None:
        return self.models.get(self.aliases.get(name, name))

    def ready(self) -> bool:
        return all(m.state == "ready" and self._healthy(m) for m in self.models.values())

    @staticmethod
    def _healthy(model: HostedModel) -> bool:
        return model.engine is None or model.engine.is_healthy()

    async def load_all(self) -> None:
        """Load every model, one after another, off the event loop."""
        for model in self.models.values():
            started = time.perf_counter()
            try:
                await self._load(model)
            except Exception as exc:  # a broken model must not take the others down
                log.exception("loading model %s failed", model.config.name)
                model.state, model.error = "failed", f"{type(exc).__name__}: {exc}"
                continue
            model.state, model.loaded_at = "ready", time.time()
            model.load_seconds = round(time.perf_counter() - started, 3)
            log.info("model %s ready in %.1fs", model.config.name, model.load_seconds)

    async def _load(self, model: HostedModel) -> None:
        cfg = model.config
        if cfg.task == "chat":
            from budrt.engine.factory import create_text_engine

            engine = await asyncio.to_thread(create_text_engine, cfg)
            await engine.start()
            model.engine = engine
        elif cfg.task == "embedding":
            embedding_model = await asyncio.to_thread(EmbeddingModel, cfg)
            batcher = EmbeddingBatcher(embedding_model, cfg.max_batch_tokens)
            batcher.start()
            model.embedder = batcher
        else:  # pragma: no cover - config validation forbids it
            raise ValueError(f"unsupported task {cfg.task}")

    async def close(self) -> None:
        for model in self.models.values():
            if model.engine is not None:
                await model.engine.stop()
            if model.embedder is not None:
                await model.embedder.stop()
