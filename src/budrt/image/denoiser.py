"""A diffusers pipeline directory, loaded and seen step by step.

`Denoiser` exposes what the batching engine needs of pipelines with Stable Diffusion's shape
(SD 1.x/2.x, SDXL base, SD3, FLUX, and the demo `ShapesDiffusionPipeline`): prompt states,
starting noise, one call of the denoising network (a UNet, or a transformer: "unet", "sd3",
"flux") on a batch of rows with a timestep per row, a scheduler per image, and decoding. SDXL's
UNet also reads a pooled text embedding and the picture's size ("time ids"); SD3's transformer the
pooled embedding, with a flow-matching scheduler; FLUX's packed latents and guidance as an input
(`image/flux.py`). Pipelines of other shapes are refused at load with a message saying so.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from budrt.image import flux

BUDRT_PIPELINES = {"ShapesDiffusionPipeline": "budrt.image.shapes_pipeline"}


class UnsupportedPipeline(ValueError):
    pass


@dataclass(frozen=True)
class PromptStates:
    """What the network reads of prompts: token states [B, L, D] and, for SDXL, SD3 and FLUX, the
    pooled text embedding [B, P] (None for SD 1.x/2.x and the demo model)."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None

    def expand(self, rows: int) -> PromptStates:
        pooled = None if self.pooled is None else self.pooled.expand(rows, -1)
        return PromptStates(self.states.expand(rows, -1, -1), pooled)

    @staticmethod
    def cat(parts: list[PromptStates]) -> PromptStates:
        pooled = [p.pooled for p in parts]
        joined = None if pooled[0] is None else torch.cat(pooled)  # type: ignore[arg-type]
        return PromptStates(torch.cat([p.states for p in parts]), joined)


def load_pipeline(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """`DiffusionPipeline.from_pretrained` on a local directory; budrt's own pipeline classes
    (named in `model_index.json`) are found here rather than among diffusers'."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import importlib

    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    index = json.loads((path / "model_index.json").read_text())
    module = BUDRT_PIPELINES.get(index.get("_class_name", ""))
    cls = getattr(importlib.import_module(module), index["_class_name"]) if module else DiffusionPipeline
    pipe = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return pipe.to(device)


def call_default(pipe: Any, name: str, fallback: float) -> float:
    """The default of `pipe.__call__`'s parameter `name` (a pipeline's recommended guidance:
    SD 1.x 7.5, SDXL 5.0, shapes-diffusion 1.5), or `fallback` where it has none."""
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    if parameter is None or not isinstance(parameter.default, int | float):
        return fallback
    return float(parameter.default)


def denoising_net(pipe: Any) -> tuple[Any, str]:
    """(the pipeline's denoising network, its kind: "unet", "sd3" or "flux"); raises
    UnsupportedPipeline for shapes the engine cannot drive."""
    name = type(pipe).__name__
    if not hasattr(pipe, "encode_prompt"):
        raise UnsupportedPipeline(f"{name} has no encode_prompt (not Stable Diffusion's shape)")
    unet = getattr(pipe, "unet", None)
    if unet is None:
        net = getattr(pipe, "transformer", None)
        takes = set(inspect.signature(net.forward).parameters) if net is not None else set()
        if {"pooled_projections", "img_ids", "txt_ids"} <= takes:
            return net, "flux"
        if "pooled_projections" not in takes or "img_ids" in takes:
            raise UnsupportedPipeline(f"{name}: only SD3's and FLUX's transformers are supported")
        return net, "sd3"
    added = getattr(unet.config, "addition_embed_type", None)
    if added not in (None, "text_time") or (added and getattr(pipe, "text_encoder_2", None) is None):
        raise UnsupportedPipeline(f"{name} needs added conditioning ({added}) other than SDXL base's")
    if getattr(pipe.config, "requires_aesthetics_score", False):
        raise UnsupportedPipeline("SDXL's refiner (aesthetic-score conditioning) is not supported yet")
    return unet, "unet"


def _decoder(vae: Any) -> Any:
    """The VAE the engine decodes with: an fp32 copy where its config says fp16 overflows
    (`force_upcast`: SDXL's), as SDXL's pipeline upcasts it for each decode."""
    if vae is None or vae.dtype != torch.float16 or not vae.config.get("force_upcast"):
        return vae
    return copy.deepcopy(vae).to(torch.float32)


class Denoiser:
    """The parts of a pipeline the engine drives, one network call per engine step."""

    def __init__(self, pipe: Any, guidance: float | None = None) -> None:
        self.net, self.kind = denoising_net(pipe)
        self.pipe = pipe
        self.device = self.net.device
        self.dtype = self.net.dtype  # of the noise and latents, as the pipelines keep them
        self.scale = int(pipe.vae_scale_factor)
        packed = self.kind == "flux"  # 2x2 patches of the latent picture per row: 4x the channels
        self.channels = int(self.net.config.in_channels) // (4 if packed else 1)
        sample = getattr(self.net.config, "sample_size", None) or pipe.default_sample_size
        self.native_size = int(sample) * self.scale
        self._guidance_input = packed and bool(self.net.config.get("guidance_embeds"))
        # A request's guidance when it names none: the model's settings', else the pipeline's own.
        self.default_guidance = call_default(pipe, "guidance_scale", 7.5) if guidance is None else guidance
        self.vae = _decoder(getattr(pipe, "vae", None))
        self._vae_shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0) if self.vae else 0.0
        # PNDM (SD 1.5's default) and others take no generator; DDIM, Euler ancestral... do.
        self._step_takes_generator = "generator" in inspect.signature(pipe.scheduler.step).parameters
        # SD3's encode_prompt wants its second and third prompts named (None: the first again);
        # FLUX's has no guidance or negative prompt (guidance is the network's input).
        takes = inspect.signature(pipe.encode_prompt).parameters
        self._more_prompts = {name: None for name in ("prompt_2", "prompt_3") if name in takes}
        self._takes_negative = "negative_prompt" in takes
        self._empty_states: PromptStates | None = None

    def new_scheduler(self, steps: int, height: int, width: int) -> Any:
        """A scheduler of its own for one image (schedulers keep per-run state: the step index),
        its timesteps set for `steps` at this size."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        if self.kind == "flux":
            rows = (height // self.scale // 2) * (width // self.scale // 2)
            flux.set_timesteps(scheduler, steps, rows, self.device)
        elif self.kind == "sd3" and scheduler.config.get("use_dynamic_shifting"):
            patch = self.net.config.patch_size
            rows = (height // self.scale // patch) * (width // self.scale // patch)
            scheduler.set_timesteps(
                steps, device=self.device, mu=flux.size_shift(scheduler.config, rows, 1.16)
            )
        else:
            scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def first_latents(self, scheduler: Any, noise: torch.Tensor) -> torch.Tensor:
        """Text to image: the noise at the scheduler's first sigma (flow matching: the noise)."""
        return noise * getattr(scheduler, "init_noise_sigma", 1.0)

    def scale_input(self, scheduler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network reads at `t` (Euler scales by sigma; DDIM, flow matching do not)."""
        scale = getattr(scheduler, "scale_model_input", None)
        return latents if scale is None else scale(latents, t)

    def add_noise(
        self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """`latents` noised to timestep `t` (img2img's start, inpainting's kept part)."""
        if hasattr(scheduler, "add_noise"):
            return scheduler.add_noise(latents, noise, t)
        return scheduler.scale_noise(latents, t, noise)  # flow matching

    def step(
        self,
        scheduler: Any,
        noise: torch.Tensor,
        t: torch.Tensor,
        latents: torch.Tensor,
        generator: torch.Generator,
    ) -> Any:
        """One step of `scheduler`, passing `generator` only where it takes one (as diffusers'
        pipelines do)."""
        if self._step_takes_generator:
            return scheduler.step(noise, t, latents, generator=generator)
        return scheduler.step(noise, t, latents)

    @torch.inference_mode()
    def encode(
        self, prompts: list[str], negatives: list[str] | None
    ) -> tuple[PromptStates, PromptStates | None]:
        """The prompts' states and, when guided, the negative prompts' (empty: the pipeline's own
        unconditional states: the empty prompt's, or zeros for SDXL). FLUX: never a negative."""
        if not self._takes_negative:
            negatives = None
        if negatives is not None and any(negatives):
            return self._encode(prompts, True, negatives)
        cond, _ = self._encode(prompts, False, None)
        if negatives is None:
            return cond, None
        return cond, self._unconditional().expand(len(prompts))

    def _encode(
        self, prompts: list[str], guided: bool, negatives: list[str] | None
    ) -> tuple[PromptStates, PromptStates | None]:
        """`encode_prompt` by keyword (SDXL's has a second prompt in the third place); it gives
        (states, negative states), for SDXL and SD3 their pooled embeddings after them, for FLUX
        (states, pooled, position ids)."""
        guidance = {"do_classifier_free_guidance": guided, "negative_prompt": negatives}
        out = self.pipe.encode_prompt(
            prompt=prompts,
            **self._more_prompts,
            device=self.device,
            num_images_per_prompt=1,
            **(guidance if self._takes_negative else {}),
        )
        if len(out) == 3:  # FLUX: (states, pooled, the states' position ids: zeros)
            return self._states(out[0], out[1]), None
        cond, negative, pooled, negative_pooled = (*out, None, None) if len(out) == 2 else out
        uncond = None if negative is None else self._states(negative, negative_pooled)
        return self._states(cond, pooled), uncond

    def _states(self, states: torch.Tensor, pooled: torch.Tensor | None) -> PromptStates:
        """In the network's dtype (the demo model's text encoder stays fp32)."""
        return PromptStates(states.to(self.dtype), None if pooled is None else pooled.to(self.dtype))

    def _unconditional(self) -> PromptStates:
        """The unconditional states, encoded once: most guided requests have no negative prompt,
        so this saves a text-encoder call per request."""
        if self._empty_states is None:
            _, self._empty_states = self._encode([""], True, None)
        assert self._empty_states is not None
        return self._empty_states

    def read(self, prompt: str) -> tuple[int, str | None]:
        """(tokens the text encoder reads of `prompt`, the part it reads when that is not all)."""
        encoder = getattr(self.pipe, "prompt_encoder", None)
        if encoder is not None:
            return encoder.read(prompt)
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(prompt, truncation=False).input_ids
        most = int(tokenizer.model_max_length)
        return (len(ids), None) if len(ids) <= most else (most, tokenizer.decode(ids[1 : most - 1]))

    def noise(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Starting noise in the network's layout, drawn as the pipelines draw it."""
        shape = (1, self.channels, height // self.scale, width // self.scale)
        return self._to_net(torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device))

    def _to_net(self, latents: torch.Tensor) -> torch.Tensor:
        """A latent picture [B, C, h, w] in the network's layout (FLUX: packed)."""
        return flux.pack(latents) if self.kind == "flux" else latents

    def latent_mask(self, repaint: np.ndarray) -> torch.Tensor:
        """Inpainting: a pixel mask [H, W] (1 = repaint) at the latents' size, in the network's
        layout: a latent cell is repainted when any of its pixels is."""
        pixels = torch.from_numpy(repaint)[None, None]
        mask = torch.nn.functional.max_pool2d(pixels, self.scale).to(self.device, self.dtype)
        return self._to_net(mask.expand(-1, self.channels, -1, -1)) if self.kind == "flux" else mask

    @torch.inference_mode()
    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt: PromptStates,
        height: int,
        width: int,
        guidance: torch.Tensor,
    ) -> torch.Tensor:
        """One network call: a row per latent, each with its timestep, prompt states and guidance
        (read only by FLUX, which takes it as an input)."""
        if self.kind == "flux":
            h, w = height // self.scale, width // self.scale
            return self.net(
                hidden_states=latents,
                timestep=timesteps.to(latents.dtype) / 1000,
                guidance=guidance.to(latents.dtype) if self._guidance_input else None,
                pooled_projections=prompt.pooled,
                encoder_hidden_states=prompt.states,
                txt_ids=torch.zeros(prompt.states.shape[1], 3, device=latents.device, dtype=latents.dtype),
                img_ids=flux.image_ids(h, w, latents.device, latents.dtype),
            ).sample
        if self.kind == "sd3":
            return self.net(
                hidden_states=latents,
                timestep=timesteps,
                encoder_hidden_states=prompt.states,
                pooled_projections=prompt.pooled,
            ).sample
        if prompt.pooled is None:
            return self.net(latents, timesteps, encoder_hidden_states=prompt.states).sample
        # SDXL: original size, crop's top left, target size, as its pipeline's defaults have them.
        sizes = torch.tensor(
            [[height, width, 0, 0, height, width]], dtype=latents.dtype, device=latents.device
        )
        added = {"text_embeds": prompt.pooled, "time_ids": sizes.expand(len(latents), -1)}
        return self.net(
            latents, timesteps, encoder_hidden_states=prompt.states, added_cond_kwargs=added
        ).sample

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Latents in the network's layout, of pictures `height` x `width` -> [B, H, W, 3] uint8."""
        if self.kind == "flux":
            latents = flux.unpack(latents, height // self.scale, width // self.scale)
        if self.vae is None:
            pixels = self.pipe.decode_latents(latents)
        else:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self._vae_shift
            pixels = self.vae.decode(latents).sample.clamp(-1, 1)
        return ((pixels.float() + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    @torch.inference_mode()
    def encode_pixels(self, pixels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """Pictures [B, H, W, 3] uint8 -> latents in the network's layout (img2img's start)."""
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().to(self.device) / 127.5 - 1
        if self.vae is None:
            return self.pipe.encode_pixels(x.to(self.dtype))
        sample = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample(generator)
        latents = (sample - self._vae_shift) * self.vae.config.scaling_factor
        return self._to_net(latents.to(self.dtype))
