"""The models one model server hosts: loaded on demand, within a memory budget, LRU-evicted.

States: `available` (known, not in memory) -> `loading` -> `ready`; `failed` when a load
failed (retried by a later request after a pause). Every request holds its model (`in_flight`)
from routing until its response ends, so a model serving a stream is never evicted. Concurrent
first requests share one load task; each waits at most `load_timeout_s`, then gets 503.

A pinned model (`pinned` in its config, or pinned by an admin: `set_pinned`) is never evicted to
make room: a load that only its eviction could make room for fails at once (`held_by` names the
pinned models) instead of waiting. An admin may also load (`start_load`) and unload (`unload`) a
model; an unloaded model loads again on its next request, like any evicted one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from budrt.config import ModelConfig
from budrt.engine import openmp
from budrt.engine.interface import Engine
from budrt.model_source import resolve_source
from budrt.observe.progress import LogReporter, ProgressReporter
from budrt.protocol.errors import APIError, invalid_request, model_not_found
from budrt.server.cost import estimate_cost
from budrt.server.embeddings import EmbeddingBatcher, EmbeddingModel

if TYPE_CHECKING:
    from budrt.image.engine import DiffusionEngine
from budrt.server.gguf_cache import dequantized_source
from budrt.server.placement import DeviceRoom, NeverFits, pinned_in_the_way, place
from budrt.server.residency import MemoryBudget

log = logging.getLogger(__name__)
ModelState = Literal["available", "loading", "ready", "failed"]
# A state as the server shows it (/v1/models, heartbeats, admin answers).
SHOWN_STATES: dict[str, str] = {
    "ready": "resident",
    "loading": "loading",
    "available": "available",
    "failed": "failed",
}
RETRY_FAILED_AFTER_S = 10.0
_TASKS = {"chat": "a chat model", "embedding": "an embedding model", "image": "an image model"}
# The config with a local path as its `source` (fetched, verified; the model registry's defaults applied).
# A model's config with `source` made a local path (fetching a registry artifact, with progress).
Resolver = Callable[[ModelConfig, ProgressReporter], ModelConfig]


@dataclass
class HostedModel:
    config: ModelConfig
    state: ModelState = "available"
    error: str | None = None
    engine: Engine | None = None
    embedder: EmbeddingBatcher | None = None
    imager: DiffusionEngine | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    failed_at: float = 0.0
    cost_bytes: int = 0  # estimated before loading; what the budget accounts
    device: str | None = None  # where it is (or was last) loaded: "cpu", "cuda:N"
    in_flight: int = 0
    last_used: float = 0.0
    loads: int = 0
    too_large: bool = False
    held_by: list[str] = field(default_factory=list)  # pinned models that kept its last load out
    pin: bool | None = None  # set by an admin (`ModelPool.set_pinned`); None: as configured
    load_task: asyncio.Task[None] | None = field(default=None, repr=False)
    # Set once the running load has its room (victims evicted), so an admin's load request can
    # answer whether a pinned model is in the way without waiting for the whole load.
    placed: asyncio.Event | None = field(default=None, repr=False)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def stepping_engine(self) -> Engine | DiffusionEngine | None:
        """The engine that runs steps (text or image), whose `stats()` the watchdog and metrics read."""
        return self.engine or self.imager

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pinned(self) -> bool:
        """Never evicted to make room for another model: pinned by an admin, else by its config."""
        return self.config.pinned if self.pin is None else self.pin

    @property
    def shown_state(self) -> str:
        return SHOWN_STATES[self.state]


class ModelPool:
    def __init__(
        self,
        configs: list[ModelConfig],
        budgets: list[MemoryBudget] | None = None,
        load_timeout_s: float = 120.0,
        resolver: Resolver | None = None,
        dequantized_dir: Path | None = None,
        progress: Callable[[str], LogReporter] = LogReporter,
    ) -> None:
        self.models: dict[str, HostedModel] = {}
        self.aliases: dict[str, str] = {}
        for cfg in configs:
            self.models[cfg.name] = HostedModel(cfg)
            for alias in cfg.aliases:
                self.aliases[alias] = cfg.name
        # One budget per device (CPU: one; CUDA: one per GPU); models are placed on one of them.
        self.budgets = budgets or [MemoryBudget("cpu", 1 << 62)]
        self.load_timeout_s = load_timeout_s
        self.resolve = resolver or (
            lambda cfg, _progress: cfg.model_copy(update={"source": str(resolve_source(cfg.source))})
        )
        self.dequantized_dir = dequantized_dir  # where GGUF models are cached dequantized; None = off
        self.progress = progress  # a load's progress, by model name: log records (observe/progress.py)
        self.preload_done = False
        self.preload_names: list[str] = []
        self._load_lock = asyncio.Lock()  # one load at a time: the budget check sees settled numbers
        self._released = asyncio.Event()

    def get(self, name: str) -> HostedModel | None:
        return self.models.get(self.aliases.get(name, name))

    def ready(self) -> bool:
        """Serving: the preload finished, its models loaded, and every resident engine is alive."""
        if not self.preload_done:
            return False
        if any(self.models[n].state == "failed" for n in self.preload_names):
            return False
        return all(self._healthy(m) for m in self.models.values() if m.state == "ready")

    @staticmethod
    def _healthy(model: HostedModel) -> bool:
        return model.engine is None or model.engine.is_healthy()

    def used_bytes(self, device: str | None = None) -> int:
        """Estimated bytes of the models loaded or loading (on `device`, or on all devices)."""
        return sum(
            m.cost_bytes
            for m in self.models.values()
            if m.state in ("ready", "loading") and (device is None or m.device == device)
        )

    def device_table(self, exclude: HostedModel | None = None) -> list[DeviceRoom]:
        """Each device's budget and the ready models on it: what the placement policy decides on."""
        return [
            DeviceRoom(
                b.device,
                b.total_bytes,
                [
                    m
                    for m in self.models.values()
                    if m is not exclude and m.state == "ready" and m.device == b.device
                ],
            )
            for b in self.budgets
        ]

    # --- requests ---

    async def acquire(self, name: str, task: str) -> HostedModel:
        """The model, loaded and held for one request; `release` it when the response ends."""
        hosted = self.get(name)
        if hosted is None:
            raise model_not_found(name)
        if hosted.config.task != task:
            raise invalid_request(
                f"The model `{name}` is {_TASKS[hosted.config.task]}; it cannot serve this endpoint.",
                param="model",
                code="model_task_mismatch",
            )
        deadline = time.monotonic() + self.load_timeout_s
        while hosted.state != "ready":  # re-checked: an eviction may slip in before we wake up
            await self._wait_loaded(hosted, deadline)
        hosted.in_flight += 1
        hosted.last_used = time.monotonic()
        return hosted

    def release(self, hosted: HostedModel) -> None:
        hosted.in_flight -= 1
        hosted.last_used = time.monotonic()
        self._released.set()

    async def _wait_loaded(self, hosted: HostedModel, deadline: float) -> None:
        if hosted.state == "failed" and time.time() - hosted.failed_at < RETRY_FAILED_AFTER_S:
            raise _unavailable(hosted)
        task = self.load(hosted)
        try:
            await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise APIError(
                503,
                f"The model `{hosted.name}` is loading; retry shortly.",
                code="model_loading",
                headers={"Retry-After": "5"},
            ) from None
        if hosted.state == "failed":
            raise _unavailable(hosted)

    # --- loading and eviction ---

    def load(self, hosted: HostedModel) -> asyncio.Task[None]:
        """The model's one load task (started if none is running)."""
        if hosted.load_task is None or hosted.load_task.done():
            hosted.placed = asyncio.Event()
            hosted.load_task = asyncio.get_running_loop().create_task(self._load(hosted))
        return hosted.load_task

    async def _load(self, hosted: HostedModel) -> None:
        if hosted.state == "ready":
            return
        hosted.state, hosted.error, hosted.held_by = "loading", None, []
        progress = self.progress(hosted.name)
        try:
            async with self._load_lock:
                started = time.perf_counter()
                cfg = hosted.config
                local = await asyncio.to_thread(self.resolve, cfg, progress)
                path = Path(local.source)
                # Every device of a server is of one kind (CPU, or its GPUs), which sets the dtype.
                kind = self.budgets[0].device
                hosted.cost_bytes = await asyncio.to_thread(estimate_cost, local, path, kind)
                hosted.device = await self._make_room(hosted)
                if hosted.placed is not None:
                    hosted.placed.set()
                if self.dequantized_dir is not None:
                    local = await openmp.to_thread(
                        dequantized_source, local, path, self.dequantized_dir, progress
                    )
                await self._start(hosted, local, progress)
                hosted.loads += 1
                hosted.state, hosted.loaded_at = "ready", time.time()
                hosted.last_used = time.monotonic()
                hosted.load_seconds = round(time.perf_counter() - started, 3)
                log.info(
                    "model %s ready in %.1fs (%d MB)", cfg.name, hosted.load_seconds, hosted.cost_bytes >> 20
                )
        except Exception as exc:  # a broken model must not take the others down
            log.warning("loading model %s failed: %s", hosted.name, exc)
            hosted.state, hosted.failed_at = "failed", time.time()
            hosted.too_large = isinstance(exc, ModelTooLarge)
            hosted.held_by = exc.names if isinstance(exc, PinnedInTheWay) else []
            plain = hosted.too_large or bool(hosted.held_by)  # our own message, said as it is
            hosted.error = str(exc) if plain else f"{type(exc).__name__}: {exc}"
            hosted.cost_bytes = 0
        finally:
            progress.end()  # its bars close, whether it loaded or not

    async def _make_room(self, hosted: HostedModel) -> str:
        """The device chosen for `hosted` (server/placement.py), once its victims are evicted."""
        deadline = time.monotonic() + self.load_timeout_s
        while True:
            try:
                placement = place(self.device_table(exclude=hosted), hosted.name, hosted.cost_bytes)
            except NeverFits as exc:
                raise ModelTooLarge(str(exc)) from None
            if placement is not None:
                for victim in placement.victims:
                    await self.evict(victim)  # type: ignore[arg-type]
                return placement.device
            # Waiting helps only while busy models hold the room; pinned ones never leave.
            pinned = pinned_in_the_way(self.device_table(exclude=hosted), hosted.cost_bytes)
            if pinned:
                raise PinnedInTheWay(hosted, pinned)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no room for {hosted.name}: the resident models are busy or pinned")
            self._released.clear()  # wait for a request to end, then look again
            try:
                await asyncio.wait_for(self._released.wait(), 1.0)
            except TimeoutError:
                pass

    async def evict(self, hosted: HostedModel) -> None:
        log.info(
            "evicting model %s from %s (idle, %d MB)", hosted.name, hosted.device, hosted.cost_bytes >> 20
        )
        hosted.state = "available"
        engine, embedder, imager = hosted.engine, hosted.embedder, hosted.imager
        hosted.engine = hosted.embedder = hosted.imager = None
        if engine is not None:
            await engine.stop()
        if embedder is not None:
            await embedder.stop()
        if imager is not None:
            await asyncio.to_thread(imager.stop)
        del engine, embedder, imager
        gc.collect()  # give the weights back now, not at some later collection
        if hosted.device and hosted.device.startswith("cuda"):  # pragma: no cover - no GPU in CI
            import torch

            with torch.cuda.device(hosted.device):
                torch.cuda.empty_cache()  # return the cached blocks, so mem_get_info sees them free

    # --- an admin's requests (server/admin_routes.py) ---

    async def start_load(self, hosted: HostedModel, wait_s: float) -> None:
        """Load `hosted` now, even within the pause after a failed load (an admin asked), and
        wait until the load has its room or has ended, at most `wait_s`: a refusal (too large,
        pinned models in the way) is known when this returns. The load goes on afterwards."""
        if hosted.state == "ready":
            return
        task = self.load(hosted)
        waiters: set[asyncio.Future[object]] = {task}
        if hosted.placed is not None:
            waiters.add(asyncio.ensure_future(hosted.placed.wait()))
        try:
            await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters - {task}:  # never the load itself: it goes on
                waiter.cancel()

    async def unload(self, hosted: HostedModel) -> None:
        """Evict `hosted` at an admin's request; nothing to do unless it is resident.

        Refused with 409, never waited for: while requests are in flight on it (`model_busy`:
        evicting would cut them off, and while traffic keeps coming a wait might never end;
        retry once it is idle), while it loads (`model_loading`: a load cannot be stopped
        halfway) and while it is pinned (`model_pinned`: unpin it first). The checks and the
        state change have no await between them, so no request takes hold of it in between."""
        if hosted.state == "loading":
            raise _conflict(
                f"The model `{hosted.name}` is loading; unload it once it is resident.", "model_loading"
            )
        if hosted.state != "ready":
            return
        if hosted.pinned:
            raise _conflict(f"The model `{hosted.name}` is pinned; unpin it first.", "model_pinned")
        if hosted.in_flight:
            raise _conflict(
                f"The model `{hosted.name}` is serving {hosted.in_flight} request(s); retry once they end.",
                "model_busy",
            )
        await self.evict(hosted)

    def set_pinned(self, hosted: HostedModel, pinned: bool) -> None:
        """Pin or unpin `hosted` until this process ends (its config's `pinned` is the lasting form)."""
        if hosted.pinned != pinned:
            log.info("model %s %s", hosted.name, "pinned" if pinned else "unpinned")
        hosted.pin = pinned
        self._released.set()  # a load waiting for room looks again at once

    async def _start(self, hosted: HostedModel, cfg: ModelConfig, progress: ProgressReporter) -> None:
        device = hosted.device or "cpu"
        if cfg.task == "chat":
            from budrt.engine.factory import create_text_engine

            engine = await openmp.to_thread(create_text_engine, cfg, device, progress)
            await engine.start()
            hosted.engine = engine
            return
        progress.report("load", 0, 1)  # from_pretrained tells nothing on the way: a bar and its time
        if cfg.task == "embedding":
            embedding_model = await openmp.to_thread(EmbeddingModel, cfg, device)
            batcher = EmbeddingBatcher(embedding_model, cfg.max_batch_tokens, cfg.max_waiting)
            batcher.start()
            hosted.embedder = batcher
        elif cfg.task == "image":
            from budrt.image.engine import start_engine

            hosted.imager = await openmp.to_thread(start_engine, cfg, device)
        else:  # pragma: no cover - config validation forbids it
            raise ValueError(f"unsupported task {cfg.task}")
        progress.report("load", 1, 1)

    async def preload(self, extra: list[str] | None = None) -> None:
        """Load the models marked `preload` (plus `extra`, e.g. those held before a restart)."""
        names = [m.name for m in self.models.values() if m.config.preload or m.pinned]
        self.preload_names = list(names)  # these must load for the server to be ready
        for name in extra or []:
            hosted = self.get(name)
            if hosted is not None and hosted.name not in names:
                names.append(hosted.name)
        for name in names:
            await self.load(self.models[name])
        self.preload_done = True

    async def close(self) -> None:
        for model in self.models.values():
            if model.load_task is not None and not model.load_task.done():
                model.load_task.cancel()
        for model in self.models.values():
            if model.engine is not None:
                await model.engine.stop()
            if model.embedder is not None:
                await model.embedder.stop()
            if model.imager is not None:
                await asyncio.to_thread(model.imager.stop)


class ModelTooLarge(Exception):
    pass


class PinnedInTheWay(Exception):
    """Only evicting pinned models would make room for the model: its load is refused."""

    def __init__(self, hosted: HostedModel, names: list[str]) -> None:
        shown = ", ".join(f"`{n}`" for n in names)
        super().__init__(
            f"model {hosted.name} needs ~{hosted.cost_bytes >> 20} MiB, held by the pinned model(s) "
            f"{shown}, which are never evicted to make room: unpin one of them first"
        )
        self.names = names


def _conflict(message: str, code: str) -> APIError:
    return APIError(409, message, param="model", code=code)


def _unavailable(hosted: HostedModel) -> APIError:
    code = "model_unavailable"
    if hosted.too_large:
        code = "model_too_large"
    elif hosted.held_by:
        code = "pinned_model_in_the_way"
    return APIError(
        503,
        f"The model `{hosted.name}` cannot be loaded: {hosted.error}",
        code=code,
        headers={} if hosted.too_large else {"Retry-After": str(int(RETRY_FAILED_AFTER_S))},
    )
