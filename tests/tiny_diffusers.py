"""Stable Diffusion 1.x, SDXL and SD3 pipeline directories with tiny random weights (their parts
and default schedulers: UNet or MMDiT, VAE, CLIP and T5 text encoders and tokenizers; PNDM, Euler,
flow matching), built in seconds
on a CPU so the model server's path for real diffusers directories is tested without a model hub."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

SIZE = 32  # pixels per side: a 16x16 latent, the VAE halving once


def _write_clip_vocab(path: Path) -> None:
    """vocab.json and merges.txt for a CLIP BPE over single characters (no merges but one)."""
    chars = string.ascii_lowercase + string.digits + ",.'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars] + ["th"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\nt h\n")


def _vae(**extra: Any) -> Any:
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
        **extra,
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


def clip_tokenizer(path: Path) -> Any:
    from transformers import CLIPTokenizer

    _write_clip_vocab(path)  # read here, then written again by save_pretrained
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


def _clip(tokenizer: Any, projected: bool = False) -> Any:
    """A tiny CLIP text encoder over `tokenizer`'s ids (`projected`: with a 32-wide projection, as
    SDXL's second and SD3's encoders have)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if projected:
        return CLIPTextModelWithProjection(_text_config(len(tokenizer), projection_dim=32)).eval()
    return CLIPTextModel(_text_config(len(tokenizer))).eval()


def sd_scheduler() -> Any:
    """SD 1.5's scheduler: PNDM with its betas."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def build_tiny_sd(path: Path) -> Path:
    """An SD 1.x pipeline saved under `path` (a diffusers directory); returns `path`."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(path / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_clip(tokenizer),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=32),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path: Path) -> Path:
    """An SDXL base pipeline (two text encoders, pooled embedding and size conditioning, Euler)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(path / "tokenizer")
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
        text_encoder=_clip(tokenizer),
        text_encoder_2=_clip(tokenizer, projected=True),
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(path / "tokenizer_2"),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


def _t5() -> tuple[Any, Any]:
    """A one-layer T5 encoder and a tokenizer of single letters (a Unigram, as T5's is)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", *string.ascii_lowercase]
    raw = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], unk_id=2))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=raw, extra_ids=0, model_max_length=256)
    config = T5Config(vocab_size=len(pieces), d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    return T5EncoderModel(config).eval(), tokenizer


def build_tiny_sd3(path: Path, shifting: bool = False) -> Path:
    """An SD3 pipeline: an MMDiT transformer over two CLIPs and a T5, flow matching (`shifting`:
    shifted by the picture's size), a VAE with a shift."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(path / "tokenizer")
    transformer = SD3Transformer2DModel(
        sample_size=SIZE // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5's width; the two CLIPs' states (32 + 32) padded to it
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIPs' pooled embeddings, side by side
        pos_embed_max_size=32,
    )
    vae = _vae(shift_factor=0.0609, scaling_factor=1.5305)  # SD3's VAE numbers
    t5, t5_tokenizer = _t5()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=shifting),
        vae=vae,
        text_encoder=_clip(tokenizer, projected=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, projected=True),
        tokenizer_2=clip_tokenizer(path / "tokenizer_2"),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_flux(path: Path) -> Path:
    """A FLUX-dev pipeline: a transformer over packed latents with guidance as an input, CLIP's
    pooled embedding and T5's states, flow matching shifted by the picture's size."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(path / "tokenizer")
    transformer = FluxTransformer2DModel(
        in_channels=16,  # 2x2 patches of the VAE's 4 channels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's width
        pooled_projection_dim=32,  # CLIP's
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    t5, t5_tokenizer = _t5()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(shift_factor=0.1159, scaling_factor=0.3611),  # FLUX's VAE numbers
        text_encoder=_clip(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(path)
    return path
