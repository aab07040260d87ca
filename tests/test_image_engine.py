"""The diffusion engine in process, on the demo model: step-level batching, seeded pictures the
same bits alone or in company (and the same as diffusers' own loop), edits, cancellation, bounds."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from budrt.config import Settings
from budrt.engine.interface import EngineOverloaded
from budrt.image.denoiser import call_default
from budrt.image.edit import make_start, read_mask
from budrt.image.engine import DiffusionEngine, ImageJob, Start, start_engine

PROMPT = "one large red circle on a white background, center"


@pytest.fixture(scope="module")
def engine() -> Iterator[DiffusionEngine]:
    eng = start_engine(Settings().model("shapes-diffusion"))
    yield eng
    eng.stop()


def job(engine: DiffusionEngine, seed: int, steps: int = 6, exact: bool = True, **extra: object) -> ImageJob:
    cond, uncond = engine.denoiser.encode([PROMPT], [""])
    return ImageJob(
        64, 64, cond, uncond, 4.0, steps, torch.Generator().manual_seed(seed), exact=exact, **extra
    )


def test_default_guidance_is_the_settings_else_the_pipelines_own(engine: DiffusionEngine) -> None:
    assert engine.denoiser.default_guidance == 1.5  # ShapesDiffusionPipeline.__call__'s default
    configured = start_engine(Settings().model("shapes-diffusion").model_copy(update={"guidance_scale": 3.0}))
    try:
        assert configured.denoiser.default_guidance == 3.0
    finally:
        configured.stop()

    class NoGuidance:
        def __call__(self, prompt: str, steps: int = 20) -> None: ...

    class Stringly:
        def __call__(self, prompt: str, guidance_scale: str = "high") -> None: ...

    assert call_default(NoGuidance(), "guidance_scale", 7.5) == 7.5
    assert call_default(Stringly(), "guidance_scale", 7.5) == 7.5


def run(engine: DiffusionEngine, jobs: list[ImageJob]) -> list[np.ndarray]:
    engine.submit(jobs)
    return [j.result.result(timeout=120) for j in jobs]


def test_seeded_picture_is_the_pipelines_and_the_same_in_a_shared_batch(engine: DiffusionEngine) -> None:
    (alone,) = run(engine, [job(engine, 7)])
    pipe = engine.denoiser.pipe
    seed = torch.Generator().manual_seed(7)
    direct = pipe(PROMPT, num_inference_steps=6, guidance_scale=4.0, generator=seed)[0]
    assert np.array_equal(alone, np.asarray(direct))
    crowd = [job(engine, s, exact=False) for s in range(20, 26)]
    together = run(engine, [*crowd[:3], job(engine, 7), *crowd[3:]])
    assert np.array_equal(together[3], alone)
    assert not np.array_equal(together[0], together[1])  # other seeds, other pictures


def test_unseeded_jobs_share_one_unet_call_and_agree_to_rounding(engine: DiffusionEngine) -> None:
    calls: list[int] = []
    predict = engine.denoiser.predict

    def counting(x: torch.Tensor, t: torch.Tensor, *rest: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return predict(x, t, *rest)  # type: ignore[arg-type]

    engine.denoiser.predict = counting  # type: ignore[method-assign]
    try:
        (alone,) = run(engine, [job(engine, 3, exact=False)])
        calls.clear()
        together = run(engine, [job(engine, s, exact=False) for s in (3, 4, 5, 6)])
    finally:
        del engine.denoiser.predict
    assert calls and max(calls) == 8  # 4 images x (conditional + unconditional) rows
    assert np.abs(together[0].astype(int) - alone).max() <= 2


def test_a_job_joins_a_running_batch_and_leaves_when_its_steps_are_done(engine: DiffusionEngine) -> None:
    started = threading.Event()
    long = job(engine, 1, steps=30, exact=False, progress=lambda step, steps, _: started.set())
    engine.submit([long])
    assert started.wait(60)
    short = job(engine, 2, steps=3, exact=False)
    engine.submit([short])
    short.result.result(timeout=60)
    assert not long.result.done()  # the short one finished while the long one kept going
    long.result.result(timeout=120)


def test_cancelled_jobs_stop_and_a_full_queue_refuses(engine: DiffusionEngine) -> None:
    slow = job(engine, 1, steps=200, exact=False)
    engine.submit([slow])
    time.sleep(0.5)
    slow.cancelled = True
    deadline = time.time() + 30
    while not slow.result.cancelled() and time.time() < deadline:
        time.sleep(0.05)
    assert slow.result.cancelled()
    small = DiffusionEngine(engine.denoiser, max_batch_images=2, max_waiting=2)  # not started
    small.submit([job(engine, 1), job(engine, 2)])
    with pytest.raises(EngineOverloaded):
        small.submit([job(engine, 3)])


def _picture() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_img2img_at_strength_zero_returns_the_input(engine: DiffusionEngine) -> None:
    picture = _picture()
    start = make_start(engine.denoiser, picture, None, 0.0, torch.Generator())
    (out,) = run(engine, [job(engine, 1, start=start)])
    assert np.array_equal(out, picture)
    half = make_start(engine.denoiser, picture, None, 0.5, torch.Generator())
    (changed,) = run(engine, [job(engine, 1, start=half)])
    assert not np.array_equal(changed, picture)


def test_inpainting_keeps_the_unmasked_pixels(engine: DiffusionEngine) -> None:
    picture = _picture()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent = repaint (OpenAI's convention)
    data = io.BytesIO()
    mask.save(data, "PNG")
    repaint = read_mask(data.getvalue(), (64, 64))
    assert repaint.sum() == 32 * 32
    start = make_start(engine.denoiser, picture, repaint, 1.0, torch.Generator())
    assert isinstance(start, Start)
    (out,) = run(engine, [job(engine, 1, start=start)])
    keep = repaint == 0
    assert np.array_equal(out[keep], picture[keep])
    assert not np.array_equal(out[~keep], picture[~keep])
