"""Stable Diffusion 1.x and SDXL pipeline directories with tiny random weights (their parts and
default schedulers: UNet, VAE, CLIP text encoders and tokenizers; PNDM, Euler), built in seconds
on a CPU so the model server's path for real diffusers directories is tested without a model hub."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

SIZE = 32  # pixels per side: a 16x16 latent, the VAE halving once


def _clip_tokenizer(path: Path) -> None:
    """vocab.json and merges.txt for a CLIP BPE over single characters (no merges but one)."""
    chars = string.ascii_lowercase + string.digits + ",.'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars] + ["th"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\nt h\n")


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def _unet(**conditioning: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=8,
        **conditioning,
    )


def _tokenizer(path: Path) -> Any:
    from transformers import CLIPTokenizer

    _clip_tokenizer(path)  # read here, then written again by save_pretrained
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)


def _text_config(vocab: int, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def build_tiny_sd(path: Path) -> Path:
    """An SD 1.x pipeline saved under `path` (a diffusers directory); returns `path`."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tokenizer(path / "tokenizer")
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))).eval(),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=32),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path: Path) -> Path:
    """An SDXL base pipeline (two text encoders, pooled embedding and size conditioning, Euler)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = _tokenizer(path / "tokenizer")
    unet = _unet(
        cross_attention_dim=64,  # both encoders' penultimate states, side by side
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size numbers + the pooled embedding
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer), projection_dim=32)).eval(),
        tokenizer=tokenizer,
        tokenizer_2=_tokenizer(path / "tokenizer_2"),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path
