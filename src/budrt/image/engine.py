"""Step-level continuous batching for diffusion: the image analogue of the text engine.

Every image is an `ImageJob` with its own scheduler, latents and step count. A thread runs
engine steps: each takes the running jobs that can share a UNet call (same size, guidance on or
off: `ImageJob.key`), oldest first, up to `max_batch_images`, and advances each by one denoising
step. A job submitted meanwhile joins at the next step; a job leaves when its own steps are done
(then it is decoded) or when it is cancelled. Classifier-free guidance runs the unconditional
rows in the same call as the conditional ones.

A seeded job (`exact`) has its UNet call to itself, so its picture is the same bits whatever else
is running (the same as the pipeline's own one-request loop): convolutions on a CPU round
differently with the batch size.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from budrt.config import ModelConfig
from budrt.engine import openmp
from budrt.engine.device import cuda_dtype
from budrt.engine.interface import EngineOverloaded
from budrt.image.denoiser import Denoiser, PromptStates, load_pipeline
from budrt.model_source import resolve_source

log = logging.getLogger(__name__)
# Called on the engine thread after each step: (steps done, steps in all, preview or None).
Progress = Callable[[int, int, "np.ndarray | None"], None]


@dataclass
class Start:
    """Where img2img and inpainting begin: the input picture's latents, noised to the strength's
    step; `mask` ([1, 1, h, w] latents, 1 = repaint) keeps the rest from the noised original."""

    latents: torch.Tensor
    pixels: np.ndarray  # [H, W, 3] the input; unmasked pixels are copied back exactly at the end
    strength: float
    mask: torch.Tensor | None = None
    pixel_mask: np.ndarray | None = None  # [H, W, 1] float, 1 = repaint


@dataclass(eq=False)
class ImageJob:
    height: int
    width: int
    cond: PromptStates  # one prompt's
    uncond: PromptStates | None  # None: no guidance
    guidance: float
    steps: int
    generator: torch.Generator
    exact: bool = False
    start: Start | None = None
    progress: Progress | None = None
    preview_every: int = 0
    result: Future[np.ndarray] = field(default_factory=Future)
    cancelled: bool = False
    # Set by the engine when the job is admitted.
    scheduler: Any = None
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    first_noise: torch.Tensor | None = None
    done_steps: int = 0
    submitted: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[int, int, bool]:
        return self.height, self.width, self.uncond is not None

    @property
    def finished(self) -> bool:
        assert self.timesteps is not None
        return self.done_steps >= len(self.timesteps)


class DiffusionEngine:
    def __init__(self, denoiser: Denoiser, max_batch_images: int = 8, max_waiting: int = 256) -> None:
        self.denoiser = denoiser
        self.max_batch_images = max_batch_images
        self.max_waiting = max_waiting
        self.inbox: queue.SimpleQueue[ImageJob | None] = queue.SimpleQueue()
        self.running: list[ImageJob] = []
        self.queued = 0  # submitted, not yet finished (changed by the loop's thread and the engine's)
        self._queued_lock = threading.Lock()
        self.last_step_at = 0.0  # the watchdog watches it move while work is pending
        self.images_done = 0
        self.image_steps = 0  # denoising steps, one per image per step: the work done
        self.unet_calls = 0  # steps / calls = how many images a UNet call served on average
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="diffusion-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self.inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, float]:
        """What the watchdog and metrics read: work pending, and counters that move with each step."""
        running = len(self.running)
        return {
            "running": running,
            "waiting": max(0, self.queued - running),
            "last_step_at": self.last_step_at,
            "requests_finished_total": self.images_done,
            "images_generated_total": self.images_done,
            "image_steps_total": self.image_steps,
            "unet_calls_total": self.unet_calls,
        }

    async def self_test(self) -> None:
        """One single-step picture at the native size, through the queue like any request."""
        size = self.denoiser.native_size
        cond, _ = await openmp.to_thread(self.denoiser.encode, ["ok"], None)
        job = ImageJob(size, size, cond, None, 1.0, 1, torch.Generator().manual_seed(0))
        self.submit([job])
        await asyncio.wrap_future(job.result)

    def submit(self, jobs: list[ImageJob]) -> None:
        """Queue jobs (all or none); EngineOverloaded when the queue has no room for them."""
        with self._queued_lock:
            if self.queued + len(jobs) > self.max_waiting:
                raise EngineOverloaded()
            self.queued += len(jobs)
        for job in jobs:
            self.inbox.put(job)

    def _count_out(self) -> None:
        with self._queued_lock:
            self.queued -= 1

    # --- the engine thread ---

    def _run(self) -> None:
        while not self._stopping:
            self._admit(block=not self.running)
            self.running = [j for j in self.running if not self._dropped(j)]
            if not self.running:
                continue
            batch = self._pick()
            try:
                self._step(batch)
                self._finish([j for j in batch if j.finished])
            except Exception as exc:  # one bad batch fails its own jobs, not the engine
                log.exception("diffusion step failed")
                self._fail(batch, exc)
            self.last_step_at = time.monotonic()

    def _admit(self, block: bool) -> None:
        if block:  # idle: let other threads' OpenMP pools spin (engine/openmp.py)
            openmp.release_thread_pool()
        try:
            job = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while job is not None:
            try:
                self._prepare(job)
                self.running.append(job)
            except Exception as exc:
                self._fail([job], exc)
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
        self._stopping = True

    def _prepare(self, job: ImageJob) -> None:
        """The job's scheduler, timesteps and starting latents (noise, or a noised input)."""
        sched = self.denoiser.new_scheduler(job.steps, job.height, job.width)
        timesteps = sched.timesteps
        noise = self.denoiser.noise(job.height, job.width, job.generator)
        if job.start is None:
            job.latents = self.denoiser.first_latents(sched, noise)
        else:
            skip = len(timesteps) - int(round(len(timesteps) * job.start.strength))
            timesteps = timesteps[skip:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(skip)
            first = timesteps[:1] if len(timesteps) else None
            job.latents = (
                job.start.latents
                if first is None
                else self.denoiser.add_noise(sched, job.start.latents, noise, first)
            )
        job.scheduler, job.timesteps, job.first_noise = sched, timesteps, noise

    def _dropped(self, job: ImageJob) -> bool:
        if not job.cancelled:
            return False
        self._count_out()
        job.result.cancel()
        return True

    def _pick(self) -> list[ImageJob]:
        """The oldest job's companions (same key), oldest first, at most `max_batch_images`."""
        key = self.running[0].key
        return [j for j in self.running if j.key == key][: self.max_batch_images]

    def _step(self, batch: list[ImageJob]) -> None:
        active = [j for j in batch if not j.finished]  # strength 0: nothing to denoise
        shared = [j for j in active if not j.exact]
        groups = ([shared] if shared else []) + [[j] for j in active if j.exact]
        for group in groups:
            noise = self._predict(group)
            self.unet_calls += 1
            self.image_steps += len(group)
            for i, job in enumerate(group):
                self._advance(job, noise[i : i + 1])

    def _predict(self, group: list[ImageJob]) -> torch.Tensor:
        """One network call for `group`; guided noise = uncond + g * (cond - uncond), per row
        (FLUX: never guided here; its network reads g)."""
        x = torch.cat(
            [self.denoiser.scale_input(j.scheduler, j.latents, j.timesteps[j.done_steps]) for j in group]
        )
        t = torch.stack([j.timesteps[j.done_steps] for j in group])
        parts = [j.cond for j in group]
        guided = group[0].uncond is not None
        if guided:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            parts = [j.uncond for j in group] + parts  # type: ignore[misc]
        scales = torch.tensor([j.guidance for j in group], dtype=torch.float32, device=x.device)
        out = self.denoiser.predict(x, t, PromptStates.cat(parts), group[0].height, group[0].width, scales)
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        if len(group) == 1:  # a scalar, as the pipeline's own loop computes it
            return uncond + group[0].guidance * (cond - uncond)
        per_row = scales.to(out.dtype).view(-1, *[1] * (out.dim() - 1))
        return uncond + per_row * (cond - uncond)

    def _advance(self, job: ImageJob, noise: torch.Tensor) -> None:
        t = job.timesteps[job.done_steps]  # type: ignore[index]
        out = self.denoiser.step(job.scheduler, noise, t, job.latents, job.generator)
        job.latents = out.prev_sample
        job.done_steps += 1
        if job.start is not None and job.start.mask is not None:
            job.latents = self._keep_unmasked(job)
        if job.progress is not None:
            preview = None
            every = job.preview_every
            if every and job.done_steps % every == 0 and not job.finished:
                x0 = getattr(out, "pred_original_sample", None)
                preview = self.denoiser.decode(x0 if x0 is not None else job.latents, job.height, job.width)[
                    0
                ]
            job.progress(job.done_steps, len(job.timesteps), preview)  # type: ignore[arg-type]

    def _keep_unmasked(self, job: ImageJob) -> torch.Tensor:
        """Inpainting: outside the mask, the original noised to the next step (clean at the end)."""
        start = job.start
        assert start is not None and start.mask is not None and job.timesteps is not None
        keep = start.latents
        if not job.finished:
            t = job.timesteps[job.done_steps : job.done_steps + 1]
            keep = self.denoiser.add_noise(job.scheduler, start.latents, job.first_noise, t)  # type: ignore[arg-type]
        return start.mask * job.latents + (1 - start.mask) * keep

    def _finish(self, done: list[ImageJob]) -> None:
        if not done:
            return
        first = done[0]  # a batch: one size
        pixels = self.denoiser.decode(torch.cat([j.latents for j in done]), first.height, first.width)  # type: ignore[misc]
        for job, picture in zip(done, pixels, strict=True):
            if job.start is not None and len(job.timesteps) == 0:  # type: ignore[arg-type]
                picture = job.start.pixels  # strength 0: the input itself, whatever the VAE
            elif job.start is not None and job.start.pixel_mask is not None:
                m = job.start.pixel_mask
                picture = (m * picture + (1 - m) * job.start.pixels).round().astype(np.uint8)
            self.running.remove(job)
            self._count_out()
            self.images_done += 1
            job.result.set_result(picture)

    def _fail(self, jobs: list[ImageJob], exc: Exception) -> None:
        for job in jobs:
            if job in self.running:
                self.running.remove(job)
            self._count_out()
            if not job.result.done():
                job.result.set_exception(exc)


def image_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`cfg.dtype`, or for "auto": on CUDA what the card computes natively (bf16, else fp16), on
    a CPU fp32 (what the image benchmarks measured)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return cuda_dtype(device) if device.type == "cuda" else torch.float32


def start_engine(cfg: ModelConfig, device: str | torch.device = "cpu") -> DiffusionEngine:
    """The model's pipeline loaded onto `device` in its dtype, its engine thread running."""
    target = torch.device(device)
    pipe = load_pipeline(resolve_source(cfg.source), target, image_dtype(cfg, target))
    engine = DiffusionEngine(
        Denoiser(pipe, cfg.guidance_scale),
        cfg.max_batch_images,
        cfg.max_waiting,
    )
    engine.start()
    return engine
