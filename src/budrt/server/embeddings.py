"""Sentence embeddings (BERT-family, e.g. all-MiniLM-L6-v2) with micro-batching.

Concurrent requests are gathered into one forward pass: the batcher takes whatever is queued
(up to a token budget) each time the model is free, so a burst costs a few passes, not one
pass per request, and a lone request does not wait for company.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from budrt.config import ModelConfig
from budrt.engine import openmp
from budrt.engine.interface import EngineOverloaded
from budrt.model_source import resolve_source


class InputTooLong(ValueError):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"input[{index}] has {tokens} tokens; this model accepts at most {limit}")
        self.index, self.tokens, self.limit = index, tokens, limit


class EmbeddingModel:
    """A sentence-transformers directory: transformer + mean pooling + L2 normalization."""

    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel  # slow import, only where needed
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        path = resolve_source(cfg.source)
        self.name = cfg.name
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)
        # float32 on CUDA too: small models, and the vectors stay comparable with the CPU's.
        self.device = torch.device(device)
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval().to(self.device)
        self.dimensions = int(self.model.config.hidden_size)
        self.max_tokens = min(
            cfg.max_model_len, _max_seq_length(path), self.model.config.max_position_embeddings
        )
        self.normalize = (path / "modules.json").exists() and "Normalize" in (
            path / "modules.json"
        ).read_text()
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self.cls_id = self.tokenizer.token_to_id("[CLS]")
        self.sep_id = self.tokenizer.token_to_id("[SEP]")

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(texts)]

    def wrap_ids(self, ids: list[int]) -> list[int]:
        """Token-id input (OpenAI allows it) gets the [CLS] ... [SEP] frame the model expects."""
        if self.cls_id is None or self.sep_id is None or (ids and ids[0] == self.cls_id):
            return ids
        return [self.cls_id, *ids, self.sep_id]

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        """Embed token-id lists; returns a [len(batch), dimensions] float32 tensor."""
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu()  # the routes serialize from CPU memory


def _max_seq_length(path: Path) -> int:
    config = path / "sentence_bert_config.json"
    if config.exists():
        return int(json.loads(config.read_text()).get("max_seq_length", 512))
    return 512


@dataclass
class _Job:
    inputs: list[list[int]]
    tokens: int
    future: asyncio.Future[torch.Tensor] = field(repr=False)


class EmbeddingBatcher:
    """Micro-batches concurrent embedding requests onto one worker thread."""

    def __init__(self, model: EmbeddingModel, max_batch_tokens: int = 4096, max_waiting: int = 256) -> None:
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        # Bounds of what waits: requests, and tokens (max_waiting full batches' worth).
        self.max_waiting = max_waiting
        self.max_waiting_tokens = max_waiting * max_batch_tokens
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.waiting_tokens = 0
        self.task: asyncio.Task[None] | None = None
        self.batches = 0

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """Raises `InputTooLong`, or `EngineOverloaded` when the queue is full (503 + Retry-After)."""
        for i, ids in enumerate(inputs):
            if len(ids) > self.model.max_tokens:
                raise InputTooLong(i, len(ids), self.model.max_tokens)
        tokens = sum(len(ids) for ids in inputs)
        waiting = self.queue.qsize()
        if waiting >= self.max_waiting or (
            waiting and self.waiting_tokens + tokens > self.max_waiting_tokens
        ):
            raise EngineOverloaded(f"{waiting} embedding requests waiting (max_waiting={self.max_waiting})")
        job = _Job(inputs, tokens, asyncio.get_running_loop().create_future())
        self.waiting_tokens += tokens
        self.queue.put_nowait(job)
        return await job.future

    async def _run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            tokens = jobs[0].tokens
            while not self.queue.empty() and tokens < self.max_batch_tokens:
                jobs.append(self.queue.get_nowait())
                tokens += jobs[-1].tokens
            self.waiting_tokens -= tokens
            jobs = [j for j in jobs if not j.future.cancelled()]
            if not jobs:
                continue
            try:
                result = await openmp.to_thread(self._forward, [j.inputs for j in jobs])
            except Exception as exc:  # fail these requests, keep serving others
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, vectors in zip(jobs, result, strict=True):
                if not job.future.done():
                    job.future.set_result(vectors)

    def _forward(self, groups: list[list[list[int]]]) -> list[torch.Tensor]:
        flat = [ids for group in groups for ids in group]
        # Sort by length so each sub-batch pads little; restore order afterwards.
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
        out = torch.empty((len(flat), self.model.dimensions))
        start = 0
        while start < len(order):
            end, budget = start, 0
            while end < len(order) and (
                end == start or budget + len(flat[order[end]]) <= self.max_batch_tokens
            ):
                budget += len(flat[order[end]])
                end += 1
            idx = order[start:end]
            out[idx] = self.model.embed([flat[i] for i in idx])
            start = end
        self.batches += 1
        results, offset = [], 0
        for group in groups:
            results.append(out[offset : offset + len(group)])
            offset += len(group)
        return results
