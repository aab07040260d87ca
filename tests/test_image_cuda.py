"""The diffusion engine on a CUDA device: for each pipeline kind (tiny random SD 1.x, SDXL, SD3,
FLUX directories), a seeded picture is the pipeline's own on the same device.

Skipped without a GPU (CI has none); bench/gpu.sh runs it on a lent GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from budrt.config import ModelConfig
from budrt.image.engine import ImageJob, start_engine
from tests.tiny_diffusers import SIZE, build_tiny_flux, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl

pytestmark = [
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
    ),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
]
BUILDERS = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}
PROMPT = "two red circles, top left"


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_seeded_picture_on_cuda_is_the_pipelines_own(kind: str, tmp_path: Path) -> None:
    path = BUILDERS[kind](tmp_path / kind)
    cfg = ModelConfig(
        name=kind, task="image", format="diffusers", source=str(path), image_sizes=[f"{SIZE}x{SIZE}"]
    )
    engine = start_engine(cfg, device="cuda")
    try:
        d = engine.denoiser
        assert d.device.type == "cuda"
        cond, uncond = d.encode([PROMPT], [""])
        job = ImageJob(
            SIZE, SIZE, cond, uncond, d.default_guidance, 4, torch.Generator().manual_seed(5), exact=True
        )
        engine.submit([job])
        ours = job.result.result(timeout=120)
        generator = torch.Generator().manual_seed(5)
        theirs = d.pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, generator=generator).images[0]
        assert np.abs(ours.astype(int) - np.asarray(theirs).astype(int)).max() <= 2
    finally:
        engine.stop()
