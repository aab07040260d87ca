"""Read a Hugging Face Llama/Qwen2 checkpoint directory (config.json + *.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from budrt.engine.llama import LlamaArgs

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Hugging Face module names -> ours (the rest of each name is identical).
_RENAMES = (
    ("model.embed_tokens.", "embed_tokens."),
    ("model.norm.", "norm."),
    (".self_attn.", ".attn."),
    (".input_layernorm.", ".input_norm."),
    (".post_attention_layernorm.", ".post_attn_norm."),
    ("model.layers.", "layers."),
)


def _args_from_config(config: dict, has_lm_head: bool) -> LlamaArgs:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    if config.get("rope_scaling"):
        raise ValueError("rope_scaling is not supported yet")
    heads = config["num_attention_heads"]
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return LlamaArgs(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=float(rope_theta),
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", not has_lm_head)),
        attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
    )


def load_safetensors(directory: Path | str) -> tuple[LlamaArgs, dict[str, torch.Tensor]]:
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            for old, new in _RENAMES:
                name = name.replace(old, new)
            weights[name] = tensor.float()
    args = _args_from_config(config, has_lm_head="lm_head.weight" in weights)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return args, weights
