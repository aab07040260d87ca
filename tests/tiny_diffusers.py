"""A Stable Diffusion 1.x pipeline directory with tiny random weights (UNet, VAE, CLIP text
encoder and tokenizer, PNDM scheduler: SD 1.5's parts and defaults), built in seconds on a CPU so
the model server's path for real diffusers directories is tested without a model hub."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SIZE = 32  # pixels per side: a 16x16 latent, the VAE halving once


def _clip_tokenizer(path: Path) -> None:
    """vocab.json and merges.txt for a CLIP BPE over single characters (no merges but one)."""
    chars = string.ascii_lowercase + string.digits + ",.'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars] + ["th"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\nt h\n")


def build_tiny_sd(path: Path) -> Path:
    """Save the pipeline under `path` (a diffusers directory) and return it."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )
    _clip_tokenizer(path / "tokenizer")  # read here, then written again by save_pretrained
    tokenizer = CLIPTokenizer(
        str(path / "tokenizer/vocab.json"), str(path / "tokenizer/merges.txt"), model_max_length=77
    )
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config).eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path
