"""A GGUF model, dequantized once into a local safetensors directory that loads in about a second.

Loading a GGUF parses the whole vocabulary in Python and dequantizes every tensor (~13 s for
SmolLM2-135M on the dev box); that is paid again at every restart. The first load writes the
dequantized weights (in the serving dtype, q/k/v and gate/up fused), the file's own quantized
blocks (4-bit ones tiled as the kernels read them), for an fp32 engine the int8 forms of its
linears (engine/int8.py), config.json and the tokenizer into the cache; later loads hand the
engine factory that directory instead. The conversion is checked before it is
kept (same model args, same tokenizer behaviour); anything unexpected falls back to the GGUF.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from budrt.config import ModelConfig
from budrt.observe.progress import NO_PROGRESS, ProgressReporter

if TYPE_CHECKING:
    import torch

    from budrt.engine.gguf_loader import GGUFModel
    from budrt.engine.llama import LlamaArgs

log = logging.getLogger(__name__)
VERSION = 6  # bump when the layout written here changes (6: each entry names its source and dtype)
ENTRY_FILE = "cache_entry.json"  # {"source": the GGUF's path, "dtype": ...}: what the entry is of
_CHECK_TEXT = "Hello, world! 123 — ünïcode <|im_start|>"


def _key(path: Path, dtype: str) -> str:
    from budrt.engine import int8

    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{dtype}:{VERSION}:{int8.FORMAT}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _entry_name(path: Path, dtype: str) -> str:
    """The cache folder of `path`'s GGUF in `dtype`, as its file, this VERSION and int8 format are now."""
    return f"{path.stem}-{_key(path, dtype)}"


def _dtype_name(cfg: ModelConfig) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    from budrt.engine.factory import auto_dtype

    return str(auto_dtype()).removeprefix("torch.")


def dequantized_source(
    cfg: ModelConfig, path: Path, root: Path, progress: ProgressReporter = NO_PROGRESS
) -> ModelConfig:
    """`cfg` pointing at the cached safetensors copy of its GGUF (made now if missing).

    Returns `cfg` unchanged (GGUF path) when it is not a GGUF or the conversion does not check out.
    `progress` hears of a conversion: phases "dequantize", then "convert" (int8 forms).
    """
    if cfg.format != "gguf" or cfg.task != "chat":
        return cfg
    try:
        dtype = _dtype_name(cfg)
        target = root / _entry_name(path, dtype)
        if not (target / "config.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            with _file_lock(root / f".{target.name}.lock"):
                if not (target / "config.json").exists():  # another process may have made it meanwhile
                    _convert(path, target, dtype, progress)
                    remove_stale(root, path)
        return cfg.model_copy(update={"format": "safetensors", "source": str(target)})
    except Exception as exc:  # the GGUF path always works: never fail a load over the cache
        log.warning("dequantized cache unavailable for %s (%s); loading the GGUF", cfg.name, exc)
        return cfg


def _convert(path: Path, target: Path, dtype: str, progress: ProgressReporter) -> None:
    from safetensors.torch import save_file

    from budrt.engine.gguf_loader import load_gguf
    from budrt.engine.safetensors_loader import _args_from_config
    from budrt.engine.tokenizer import MAX_TOKEN_CHARS_KEY, TextTokenizer

    gguf = load_gguf(path, progress)
    args = gguf.args
    weights = _stored_weights(gguf, dtype, progress)
    config = {
        "model_type": "qwen3" if args.qk_norm else "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
        "rms_norm_eps": args.rms_norm_eps,
        "max_position_embeddings": args.max_position_embeddings,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": args.attention_bias,
    }
    round_trip = _args_from_config(config, has_lm_head="lm_head.weight" in weights)
    if dataclasses.asdict(round_trip) != dataclasses.asdict(args):
        raise ValueError(f"config does not round-trip: {round_trip} != {args}")
    tokenizer = TextTokenizer.from_gguf_metadata(gguf.metadata)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config))
        tokenizer.backend.save(str(tmp / "tokenizer.json"))
        tok_config = {
            "chat_template": tokenizer.chat_template,
            "bos_token": tokenizer.bos_token or None,
            "eos_token": tokenizer.eos_token or None,
            "add_bos_token": tokenizer.add_bos,
            MAX_TOKEN_CHARS_KEY: tokenizer.max_token_chars,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_ids}))
        (tmp / ENTRY_FILE).write_text(json.dumps({"source": str(path.resolve()), "dtype": dtype}))
        _check_tokenizer(tokenizer, TextTokenizer.from_directory(tmp))
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("dequantized %s into %s (%s)", path.name, target, dtype)


def remove_stale(root: Path, path: Path) -> None:
    """Remove the entries of `path`'s GGUF that no load will read again: made by an earlier
    VERSION (each ~1.5x the file's dequantized size) or from an earlier state of the file. An entry
    of the same name stem without `ENTRY_FILE` predates VERSION 6; one of another dtype now is kept."""
    for entry in root.glob(f"{path.stem}-*"):
        key = entry.name.removeprefix(f"{path.stem}-")
        if not entry.is_dir() or len(key) != 32 or any(c not in "0123456789abcdef" for c in key):
            continue  # another model's entry whose name starts the same
        try:
            marker = json.loads((entry / ENTRY_FILE).read_text())
        except FileNotFoundError:
            stale = True
        except (OSError, ValueError):
            continue  # unreadable: not ours to judge
        else:
            stale = marker.get("source") == str(path.resolve()) and entry.name != _entry_name(
                path, str(marker.get("dtype"))
            )
        if stale:
            log.info("removing a stale dequantized cache entry: %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _stored_weights(gguf: GGUFModel, dtype: str, progress: ProgressReporter) -> dict[str, torch.Tensor]:
    """The tensors to store, by Hugging Face names, as the model reads them: q/k/v and gate/up
    fused, the file's 4-bit blocks tiled (engine/quant.py), so that a restart concatenates and
    packs nothing (~0.35 s of SmolLM2's load on the dev box)."""
    import torch

    from budrt.engine import quant
    from budrt.engine.llama import fuse_weights
    from budrt.engine.safetensors_loader import _our_name

    dense, small = dict(gguf.weights), dict(gguf.quantized)
    fuse_weights(dense, small, {})
    weights = {}
    for name, tensor in dense.items():
        hf = _to_hf_name(name)
        if _our_name(hf) != name:
            raise ValueError(f"no round-trip name for {name}")
        weights[hf] = tensor.to(getattr(torch, dtype)).contiguous()
    for name, copy in small.items():  # the file's quantized blocks, exact
        if isinstance(copy, quant.Q4Weight) and quant.fits(copy):
            copy = quant.pack_tiles(copy)
        weights.update(copy.to_tensors(_to_hf_name(name)))
    weights.update(_int8_forms(dense, gguf.args, dtype, progress))
    return weights


def _int8_forms(
    weights: dict[str, torch.Tensor], args: LlamaArgs, dtype: str, progress: ProgressReporter
) -> dict[str, torch.Tensor]:
    """The int8 forms of the linears' weights (engine/int8.py), where an fp32 engine on this
    machine can read them: a restart then reads a quarter of the bytes and rounds nothing (the
    load of SmolLM2 spent ~1 s rounding fp32 weights)."""
    from budrt.engine import int8, kernels
    from budrt.engine.llama import linear_weight_names

    if dtype != "float32" or not (int8.available() and kernels.prepare()):
        return {}
    forms = {}
    names = linear_weight_names(weights, args)
    for i, name in enumerate(names):
        progress.report("convert", i, len(names))
        forms.update(int8.to_tensors(int8.round_weight(weights[name]), _to_hf_name(name)))
    progress.report("convert", len(names), len(names))
    return forms


def _to_hf_name(name: str) -> str:
    if name.startswith("layers."):
        name = "model." + name
        for ours, theirs in ((".attn.", ".self_attn."), (".input_norm.", ".input_layernorm.")):
            name = name.replace(ours, theirs)
        return name.replace(".post_attn_norm.", ".post_attention_layernorm.")
    if name.startswith(("embed_tokens.", "norm.")):
        return "model." + name
    return name  # lm_head.weight


def _check_tokenizer(a: object, b: object) -> None:
    for field in ("bos_token_id", "add_bos", "chat_template", "max_token_chars"):
        if getattr(a, field) != getattr(b, field):
            raise ValueError(f"tokenizer {field} differs after conversion")
    if set(a.eos_token_ids) != set(b.eos_token_ids):  # type: ignore[attr-defined]
        raise ValueError("tokenizer eos_token_ids differ after conversion")
    if a.encode(_CHECK_TEXT) != b.encode(_CHECK_TEXT):  # type: ignore[attr-defined]
        raise ValueError("tokenizer encodes differently after conversion")


@contextlib.contextmanager
def _file_lock(path: Path):  # type: ignore[no-untyped-def]
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
