"""Stable Diffusion 1.x, SDXL, SD3 and FLUX pipeline directories (tiny random weights, their parts
and default schedulers) through the same loader, engine and server as the demo model: the path
real diffusers directories take, tested on a CPU."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from budrt.config import ModelConfig, Settings
from budrt.image.denoiser import UnsupportedPipeline, denoising_net
from budrt.image.edit import make_start
from budrt.image.engine import DiffusionEngine, ImageJob, start_engine
from tests.tiny_diffusers import SIZE, build_tiny_flux, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl
from tests.tiny_models import start_server

PROMPT = "two red circles, top left"
# diffusers' Euler scheduler (SDXL's) builds its sigmas with np.array(a torch tensor), which numpy 2
# flags; nothing of budrt's.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"
)


# Each kind: how to build it, its pipeline class, its __call__'s default guidance, its native size
# (FLUX's is its pipeline's default_sample_size, 128 latents; these are served at SIZE).
KINDS = {
    "sd": (build_tiny_sd, "StableDiffusionPipeline", 7.5, SIZE),
    "sdxl": (build_tiny_sdxl, "StableDiffusionXLPipeline", 5.0, SIZE),
    "sd3": (build_tiny_sd3, "StableDiffusion3Pipeline", 7.0, SIZE),
    "sd3-shifted": (partial(build_tiny_sd3, shifting=True), "StableDiffusion3Pipeline", 7.0, SIZE),
    "flux": (build_tiny_flux, "FluxPipeline", 3.5, 256),
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def sd_dir(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return KINDS[kind][0](tmp_path_factory.mktemp(f"tiny-{kind}") / kind)


def _config(path: Path) -> ModelConfig:
    return ModelConfig(
        name="tiny-sd",
        task="image",
        format="diffusers",
        source=str(path),
        default_steps=4,
        image_sizes=[f"{SIZE}x{SIZE}"],
    )


@pytest.fixture(scope="module")
def engine(sd_dir: Path) -> Iterator[DiffusionEngine]:
    eng = start_engine(_config(sd_dir))
    yield eng
    eng.stop()


def _job(engine: DiffusionEngine, seed: int, **extra: object) -> ImageJob:
    cond, uncond = engine.denoiser.encode([PROMPT], [""])
    generator = torch.Generator().manual_seed(seed)
    guidance = engine.denoiser.default_guidance
    return ImageJob(SIZE, SIZE, cond, uncond, guidance, 4, generator, exact=True, **extra)


def test_the_directory_loads_with_its_own_defaults(kind: str, engine: DiffusionEngine) -> None:
    d = engine.denoiser
    _, pipeline, guidance, native = KINDS[kind]
    assert type(d.pipe).__name__ == pipeline and d.vae is not None
    assert d.native_size == native and d.default_guidance == guidance  # its __call__'s
    assert d.read(PROMPT) == (len(d.pipe.tokenizer(PROMPT).input_ids), None)
    tokens, kept = d.read("red " * 100)  # past CLIP's 77 tokens: what it reads is reported
    assert tokens == 77 and kept is not None and kept.startswith("red") and len(kept) < 400


def test_seeded_picture_is_the_pipelines_own(engine: DiffusionEngine) -> None:
    job = _job(engine, 3)
    engine.submit([job])
    ours = job.result.result(timeout=120)
    pipe = engine.denoiser.pipe
    generator = torch.Generator().manual_seed(3)
    theirs = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, generator=generator).images[0]
    # The same latents (SDXL: with the pooled embedding, the size conditioning and zeros for the
    # empty negative prompt); the last step to 8 bits rounds (x+1)*127.5 where diffusers rounds
    # (x/2+0.5)*255.
    assert np.abs(ours.astype(int) - np.asarray(theirs).astype(int)).max() <= 1


def test_img2img_and_inpainting_go_through_the_vae(engine: DiffusionEngine) -> None:
    picture = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    zero = make_start(engine.denoiser, picture, None, 0.0, torch.Generator().manual_seed(0))
    repaint = np.zeros((SIZE, SIZE), dtype=np.float32)
    repaint[8:24, 8:24] = 1
    masked = make_start(engine.denoiser, picture, repaint, 0.8, torch.Generator().manual_seed(0))
    jobs = [_job(engine, 1, start=zero), _job(engine, 1, start=masked)]
    engine.submit(jobs)
    same, inpainted = (j.result.result(timeout=120) for j in jobs)
    assert np.array_equal(same, picture)
    keep = repaint == 0
    assert np.array_equal(inpainted[keep], picture[keep]) and not np.array_equal(inpainted, picture)


def test_the_server_serves_it_at_its_configured_size(sd_dir: Path, tmp_path: Path) -> None:
    proc, url = start_server(tmp_path, [_config(sd_dir)], self_test_interval_s=0)
    try:
        body = {"model": "tiny-sd", "prompt": PROMPT, "seed": 4, "response_format": "b64_json"}
        r = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        picture = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        assert picture.size == (SIZE, SIZE) and r.json()["usage"]["steps"] == 4
        wrong = httpx.post(url + "/v1/images/generations", json={**body, "size": "48x48"}, timeout=30)
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "size"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_pipelines_of_other_shapes_are_refused_saying_why() -> None:
    class Config(dict):
        def __getattr__(self, name: str) -> object:
            return self.get(name)

    class PixArtLike:  # a transformer reading no pooled embedding
        def forward(self, hidden_states: object, encoder_hidden_states: object, timestep: object) -> None: ...

    class Pipe:
        def __init__(self, **parts: object) -> None:
            self.__dict__.update(parts)
            self.scheduler = type("S", (), {"config": Config()})()
            self.config = Config()

        def encode_prompt(self) -> None: ...

    with pytest.raises(UnsupportedPipeline, match="only SD3's and FLUX's transformers"):
        denoising_net(Pipe(transformer=PixArtLike()))
    refiner = Pipe(
        unet=type("U", (), {"config": Config(addition_embed_type="text_time")})(), text_encoder_2=1
    )
    refiner.config = Config(requires_aesthetics_score=True)
    with pytest.raises(UnsupportedPipeline, match="refiner"):
        denoising_net(refiner)
    kandinsky = Pipe(unet=type("U", (), {"config": Config(addition_embed_type="image")})())
    with pytest.raises(UnsupportedPipeline, match="added conditioning"):
        denoising_net(kandinsky)
    with pytest.raises(UnsupportedPipeline, match="encode_prompt"):
        denoising_net(object())


def test_a_configured_dtype_runs_the_whole_path_in_it(kind: str, sd_dir: Path) -> None:
    # What CUDA's "auto" picks (bf16 or fp16), run here: noise, states, masks and latents in the
    # network's dtype, decoding from it.
    cfg = _config(sd_dir).model_copy(update={"dtype": "bfloat16"})
    engine = start_engine(cfg)
    try:
        d = engine.denoiser
        assert d.dtype == torch.bfloat16 and d.net.dtype == torch.bfloat16
        picture = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        repaint = np.zeros((SIZE, SIZE), dtype=np.float32)
        repaint[:16] = 1
        masked = make_start(d, picture, repaint, 0.7, torch.Generator().manual_seed(0))
        jobs = [_job(engine, 2), _job(engine, 2, start=masked)]
        engine.submit(jobs)
        ours, inpainted = (j.result.result(timeout=120) for j in jobs)
        theirs = d.pipe(
            PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, generator=torch.Generator().manual_seed(2)
        ).images[0]
        assert np.abs(ours.astype(int) - np.asarray(theirs).astype(int)).max() <= 2
        assert np.array_equal(inpainted[16:], picture[16:])
    finally:
        engine.stop()


def test_the_demo_model_runs_in_bfloat16() -> None:
    cfg = Settings().model("shapes-diffusion").model_copy(update={"dtype": "bfloat16"})
    engine = start_engine(cfg)
    try:
        cond, uncond = engine.denoiser.encode(["one large red circle on a white background, center"], [""])
        job = ImageJob(64, 64, cond, uncond, 1.5, 4, torch.Generator().manual_seed(0))
        engine.submit([job])
        assert job.result.result(timeout=120).shape == (64, 64, 3)
    finally:
        engine.stop()


def test_float16_decodes_with_an_fp32_vae_where_its_config_says_so(tmp_path: Path) -> None:
    # SDXL's VAE overflows in fp16 (force_upcast): its pipeline upcasts it for each decode, the
    # engine keeps an fp32 copy (the pipeline's own stays fp16).
    cfg = _config(build_tiny_sdxl(tmp_path / "sdxl")).model_copy(update={"dtype": "float16"})
    engine = start_engine(cfg)
    try:
        d = engine.denoiser
        assert d.dtype == torch.float16 and d.vae.dtype == torch.float32 and d.pipe.vae.dtype == torch.float16
        job = _job(engine, 0)
        engine.submit([job])
        picture = job.result.result(timeout=120)
        assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0
    finally:
        engine.stop()
