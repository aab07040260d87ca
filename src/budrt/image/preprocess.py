"""From an image request to what the engine runs: prompt, size, steps, guidance, one seed per image.

Every check that depends on the model (its sizes, step bounds, the text encoder's length) is made
here, before anything is queued, and refused with a 400 naming the parameter.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Protocol

from budrt.config import ModelConfig
from budrt.protocol.errors import invalid_request
from budrt.protocol.schemas import MAX_SEED, ImageGenerationRequest

_SIZE = re.compile(r"^([1-9][0-9]{1,4})x([1-9][0-9]{1,4})$")
# OpenAI's quality names -> a fraction of the model's default steps.
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 2.0, "hd": 2.0}


class ModelTraits(Protocol):
    """What planning needs of a loaded pipeline (`image/denoiser.Denoiser` has it)."""

    native_size: int  # the UNet's picture side, pixels
    default_guidance: float  # when the request names none

    def read(self, prompt: str) -> tuple[int, str | None]:
        """(tokens the text encoder reads of `prompt`, the part it reads when that is not all)."""
        ...


@dataclass(frozen=True)
class ImagePlan:
    prompt: str  # as the encoder reads it (normalized, truncated)
    prompt_tokens: int
    revised_prompt: str | None  # set when `prompt` differs from what the client sent
    negative_prompt: str | None  # None: no guidance
    width: int
    height: int
    steps: int
    guidance: float
    seeds: list[int]  # one per image: seed + i
    seeded: bool  # the client chose the seed: the pictures must be reproducible


def normalize(prompt: str) -> str:
    """Whitespace runs (control characters included) become one space; ends trimmed."""
    return " ".join("".join(c if c.isprintable() else " " for c in prompt).split())


def allowed_sizes(cfg: ModelConfig, native: int) -> list[str]:
    return cfg.image_sizes or [f"{native}x{native}"]


def parse_size(size: str | None, allowed: list[str]) -> tuple[int, int]:
    """(width, height) of a `WxH` among `allowed`; None or "auto" is the first of them."""
    chosen = allowed[0] if size in (None, "auto") else size
    match = _SIZE.match(chosen or "")
    if match is None or chosen not in allowed:
        raise invalid_request(
            f"Unsupported size {size!r}; this model makes {', '.join(allowed)}.", param="size"
        )
    return int(match.group(1)), int(match.group(2))


def choose_steps(req: ImageGenerationRequest, cfg: ModelConfig) -> int:
    if req.steps is not None:
        if req.steps > cfg.max_steps:
            raise invalid_request(
                f"'steps' is {req.steps}; this model allows at most {cfg.max_steps}.", param="steps"
            )
        return req.steps
    return max(1, min(cfg.max_steps, round(cfg.default_steps * QUALITY_STEPS[req.quality])))


def plan(req: ImageGenerationRequest, cfg: ModelConfig, model: ModelTraits) -> ImagePlan:
    prompt = normalize(req.prompt)
    if not prompt:
        raise invalid_request("'prompt' must hold some text.", param="prompt")
    tokens, kept = model.read(prompt)
    width, height = parse_size(req.size, allowed_sizes(cfg, model.native_size))
    guidance = model.default_guidance if req.guidance_scale is None else req.guidance_scale
    negative = normalize(req.negative_prompt or "") if guidance > 1.0 else None
    first = secrets.randbelow(MAX_SEED) if req.seed is None else req.seed
    seeds = [(first + i) % MAX_SEED for i in range(req.n)]
    prompt_read = prompt if kept is None else kept
    revised = prompt_read if prompt_read != req.prompt else None
    return ImagePlan(
        prompt_read,
        tokens,
        revised,
        negative,
        width,
        height,
        choose_steps(req, cfg),
        guidance,
        seeds,
        req.seed is not None,
    )
