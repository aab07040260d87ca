"""Read a GGUF file: hyperparameters, metadata and (dequantized) weights for `LlamaForCausalLM`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from budrt.engine import quant
from budrt.engine.llama import LlamaArgs
from budrt.observe.progress import NO_PROGRESS, ProgressReporter

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor name (after `blk.N.`) -> our module path inside `layers.N`.
_LAYER_NAMES = {
    "attn_norm": "input_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",  # Qwen3 QK-norm
    "attn_k_norm": "attn.k_norm",
    "ffn_norm": "post_attn_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass
class GGUFModel:
    args: LlamaArgs
    weights: dict[str, torch.Tensor]  # our parameter names -> fp32 tensors
    metadata: dict[str, Any]  # every key/value field of the file (tokenizer.*, general.*, ...)
    # The file's own 4-bit blocks of Q4_0/Q4_1 linear weights, by parameter name (see engine/quant.py).
    quantized: dict[str, quant.Q4Weight | quant.Q8Weight] = dataclasses.field(default_factory=dict)


def read_metadata(path: Path | str, reader: GGUFReader | None = None) -> dict[str, Any]:
    reader = reader or GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation.

    For llama-arch models the converter reorders each head's rows from the HF "rotate_half" layout
    (first half / second half of the head dim) to interleaved pairs, because llama.cpp's RoPE rotates
    adjacent pairs. Our RoPE is HF's, so put the rows back. Works for weights and biases.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind in ("none", ""):
        return None
    if kind != "linear":
        raise ValueError(f"GGUF rope scaling {kind!r} is not supported (supported: linear)")
    return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}


def _args_from_metadata(
    meta: dict[str, Any], has_output: bool, has_qkv_bias: bool, has_qk_norm: bool = False
) -> LlamaArgs:
    arch = meta["general.architecture"]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF file lacks {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    return LlamaArgs(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings=not has_output,
        attention_bias=has_qkv_bias,
        qk_norm=has_qk_norm,
        rope_scaling=_rope_scaling(meta, arch),
    )


def load_gguf(path: Path | str, progress: ProgressReporter = NO_PROGRESS) -> GGUFModel:
    """Load a GGUF model, dequantizing every tensor to fp32 (callers cast to the serving dtype).
    `progress` hears of the file's tensor bytes dequantized (phase "dequantize")."""
    reader = GGUFReader(path)
    meta = read_metadata(path, reader)
    names = {t.name for t in reader.tensors}
    args = _args_from_metadata(
        meta,
        has_output="output.weight" in names,
        has_qkv_bias="blk.0.attn_q.bias" in names,
        has_qk_norm="blk.0.attn_q_norm.weight" in names,
    )
    model = GGUFModel(args=args, weights={}, metadata=meta)
    permuted = meta["general.architecture"] == "llama"
    total, done = sum(int(t.n_bytes) for t in reader.tensors), 0
    for tensor in reader.tensors:
        progress.report("dequantize", done, total)  # a clock read: the reporter throttles
        _add_tensor(model, tensor, permuted)
        done += int(tensor.n_bytes)
    progress.report("dequantize", total, total)
    return model


def _add_tensor(model: GGUFModel, tensor: ReaderTensor, permuted: bool) -> None:
    """One tensor of the file into `model`: dequantized, under our name, with its quantized copy."""
    args, weights, quantized = model.args, model.weights, model.quantized
    # gguf dequantizes to numpy in PyTorch's [out, in] order already. Unquantized tensors come
    # back as read-only views of the memory-mapped file, hence the copy.
    value = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    if tensor.name in _GLOBAL_NAMES:
        weights[_GLOBAL_NAMES[tensor.name]] = value
        shape = tuple(value.shape)
        q8 = quant.q8_from_gguf(tensor.data, tensor.tensor_type, shape) if value.dim() == 2 else None
        if q8 is not None:  # the token embedding / lm_head, for small decode steps' logits
            quantized[_GLOBAL_NAMES[tensor.name]] = q8
        return
    if tensor.name == "rope_freqs.weight":
        # Llama 3.1+ RoPE scaling, as llama.cpp stores it: one divisor per rotary frequency.
        if args.rope_scaling is not None:
            raise ValueError("GGUF has both rope_freqs and a rope scaling type")
        scaling = {"rope_type": "freq_factors", "factors": value.flatten().tolist()}
        model.args = dataclasses.replace(args, rope_scaling=scaling)
        return
    match = _LAYER_RE.match(tensor.name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return  # tensors the supported architectures do not use
    layer, kind, suffix = match.groups()
    name = f"layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
    q4 = quant.from_gguf(tensor.data, tensor.tensor_type, tuple(value.shape)) if value.dim() == 2 else None
    if permuted and kind in ("attn_q", "attn_k"):
        heads = args.num_heads if kind == "attn_q" else args.num_kv_heads
        value = _unpermute(value, heads)
        q4 = q4 and q4.map_rows(lambda t, heads=heads: _unpermute(t, heads))
    weights[name] = value
    if q4 is not None:
        quantized[name] = q4
