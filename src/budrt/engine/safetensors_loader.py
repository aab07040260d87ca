"""Read a Hugging Face Llama/Mistral/Qwen2/Qwen3 checkpoint directory (config.json + *.safetensors)."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from budrt.engine.llama import LlamaArgs
from budrt.engine.rope import ROPE_TYPES
from budrt.observe.progress import NO_PROGRESS, ProgressReporter

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Hugging Face module names -> ours (the rest of each name is identical).
_RENAMES = (
    ("model.embed_tokens.", "embed_tokens."),
    ("model.norm.", "norm."),
    (".self_attn.", ".attn."),
    (".input_layernorm.", ".input_norm."),
    (".post_attention_layernorm.", ".post_attn_norm."),
    ("model.layers.", "layers."),
)


def _rope(config: dict) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling) from either config style.

    Older checkpoints write `rope_theta` and `rope_scaling` at the top level; transformers 5 writes one
    `rope_parameters` dict holding both. A scaling of type "default" is no scaling at all.
    """
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    theta = float(params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type {kind!r} is not supported (supported: {ROPE_TYPES})")
    return theta, {**params, "rope_type": kind}


def _max_positions(config: dict) -> int:
    """The context we may serve exactly: sliding-window attention is not implemented, so a model
    that really uses a window (Mistral 7B v0.1: 4096) is served only up to the window's length."""
    limit = config.get("max_position_embeddings", 2048)
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", config.get("model_type") == "mistral")
    if window and uses_window:
        limit = min(limit, int(window))
    return limit


def _args_from_config(config: dict, has_lm_head: bool) -> LlamaArgs:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    heads = config["num_attention_heads"]
    rope_theta, rope_scaling = _rope(config)
    return LlamaArgs(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rope_theta=rope_theta,
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=_max_positions(config),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", not has_lm_head)),
        attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        rope_scaling=rope_scaling,
    )


def _our_name(stored: str) -> str:
    for old, new in _RENAMES:
        stored = stored.replace(old, new)
    return stored


def _files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    return files


def stored_names(directory: Path | str) -> set[str]:
    """The tensors a checkpoint directory holds, by our names, read from the files' headers only."""
    names: set[str] = set()
    for file in _files(Path(directory)):
        with safe_open(str(file), framework="pt") as f:
            names.update(_our_name(stored) for stored in f.keys())  # noqa: SIM118 - not a dict
    return names


def _tensor_bytes(file: Path) -> dict[str, int]:
    """Each tensor's size in `file`, from its header (8 bytes of length, then JSON)."""
    with file.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def load_safetensors(
    directory: Path | str,
    skip: Collection[str] = (),
    progress: ProgressReporter = NO_PROGRESS,
    dtype: torch.dtype = torch.float32,
    borrow: Collection[str] = (),
) -> tuple[LlamaArgs, dict[str, torch.Tensor]]:
    """The model's hyperparameters and its tensors by our names, except those named in `skip`
    (never read from disk), floats in `dtype` (the serving dtype: the gguf cache stores them in
    it, so a bf16 engine's weights are copied, not widened to fp32 and narrowed again). Those
    named in `borrow` and stored in `dtype` (or as integers) are views of the mapped file: the
    caller packs them into new memory and drops them. `progress` hears of the bytes read (phase "read")."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    names: set[str] = set()
    sizes = {file: _tensor_bytes(file) for file in _files(directory)}
    total = sum(n for file in sizes.values() for stored, n in file.items() if _our_name(stored) not in skip)
    done = 0
    for file, stored_sizes in sizes.items():
        with safe_open(str(file), framework="pt") as f:
            for stored in f.keys():  # noqa: SIM118 - not a dict
                name = _our_name(stored)
                names.add(name)
                if name in skip:
                    continue
                progress.report("read", done, total)  # a clock read: the reporter throttles
                tensor = f.get_tensor(stored)
                # Only the model's own weights and biases take the serving dtype: the parts of the
                # gguf cache's small copies (engine/quant.py, engine/int8.py) stay as stored, their
                # scales too. Copies, not views of the mapped file: one kept view holds every page
                # of the file read during the load (SmolLM2's int8 model server: 639 MB more
                # resident).
                dense = tensor.is_floating_point() and name.endswith((".weight", ".bias"))
                if name in borrow and (tensor.dtype == dtype or not tensor.is_floating_point()):
                    weights[name] = tensor
                else:
                    weights[name] = tensor.to(dtype, copy=True) if dense else tensor.clone()
                done += stored_sizes[stored]
    progress.report("read", total, total)
    args = _args_from_config(config, has_lm_head="lm_head.weight" in names)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return args, weights
