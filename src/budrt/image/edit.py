"""Where an edit starts: img2img from an input picture at a strength, inpainting under a mask.

OpenAI's mask is a picture whose transparent pixels (alpha 0) mark what to repaint; a mask with
no alpha channel marks it in white, as diffusers' inpainting pipelines read it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from budrt.image.denoiser import Denoiser
from budrt.image.encode import open_upload
from budrt.image.engine import Start


def read_mask(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """[H, W] float32, 1 = repaint; ValueError when it is not a readable image."""
    image = open_upload(data)
    if image.size != size:
        image = image.resize(size, Image.Resampling.NEAREST)
    if "A" in image.getbands():
        return (np.asarray(image.getchannel("A")) < 128).astype(np.float32)
    return (np.asarray(image.convert("L")) >= 128).astype(np.float32)


@torch.inference_mode()
def make_start(
    denoiser: Denoiser,
    picture: np.ndarray,
    repaint: np.ndarray | None,
    strength: float,
    generator: torch.Generator,
) -> Start:
    """The input's latents, and for inpainting the mask at the latents' size: a latent cell is
    repainted when any of its pixels is (the pixels outside are copied back exactly at the end)."""
    latents = denoiser.encode_pixels(picture[None], generator)
    if repaint is None:
        return Start(latents, picture, strength)
    return Start(latents, picture, strength, denoiser.latent_mask(repaint), repaint[..., None])
