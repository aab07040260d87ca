"""FLUX's latent layout and schedule, for `image/denoiser.py`.

FLUX's transformer reads latents packed into a sequence: each 2x2 patch of the [C, h, w] latent
picture becomes one row of 4C values, with its (0, row, column) position as an id. Its
flow-matching schedule runs from sigma 1 to 1/steps, shifted by `mu`, which grows with the
number of rows (bigger pictures stay noisy longer). Guidance is an input of the network (FLUX-dev
was distilled from guided outputs), not a second, unconditional pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C]."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h/2 * w/2, 4C] -> [B, C, h, w]."""
    b, _, channels = latents.shape
    patches = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The rows' positions [h/2 * w/2, 3]: (0, patch row, patch column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def size_shift(config: Any, rows: int, max_shift: float) -> float:
    """`mu`, the schedule's shift for a picture of `rows` rows: linear in the rows between the
    scheduler config's base and max (SD3's pipeline uses the same rule when its scheduler shifts,
    with its own default `max_shift`)."""
    base, most = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    low, high = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    return low + (high - low) * (rows - base) / (most - base)


def set_timesteps(scheduler: Any, steps: int, rows: int, device: torch.device) -> None:
    """FLUX's schedule for a picture of `rows` packed rows, as its pipeline sets it."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=size_shift(scheduler.config, rows, 1.15), device=device)
