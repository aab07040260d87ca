"""A model's memory cost, estimated before loading it: weights + its KV cache reservation.

Estimates read only file sizes and headers (safetensors JSON header, GGUF key/values), never the
weights, so deciding what to evict costs milliseconds, not a load.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

from budrt.config import ModelConfig
from budrt.model_source import resolve_source

# Activations, allocator slack, tokenizer: a share on top of weights + KV.
OVERHEAD = 0.10
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ST_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
# GGUF quantized weights are dequantized at load. Q4 formats take ~0.56-0.75 bytes per weight on
# disk (embeddings are often kept at higher precision); 0.6 errs on the side of too much.
_GGUF_BYTES_PER_PARAM = 0.6


def estimate_cost(cfg: ModelConfig, path: Path, device: str = "cpu") -> int:
    """Bytes the model will hold once loaded on a `device` of that kind ("cpu", "cuda:0"...; the
    serving dtype depends on it); a configured `memory_bytes` wins."""
    if cfg.memory_bytes is not None:
        return cfg.memory_bytes
    elem = _element_bytes(cfg, device)
    if cfg.format == "gguf":
        meta = read_gguf_header(path)
        weights = int(path.stat().st_size / _GGUF_BYTES_PER_PARAM) * elem
        arch = str(meta.get("general.architecture", "llama"))
        heads = int(meta.get(f"{arch}.attention.head_count", 1))
        dims = {
            "num_hidden_layers": meta.get(f"{arch}.block_count", 0),
            "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
            "head_dim": meta.get(f"{arch}.attention.key_length")
            or int(meta.get(f"{arch}.embedding_length", 0)) // max(heads, 1),
        }
    elif cfg.format == "diffusers":
        weights, dims = _diffusers_numel(path) * elem, {}
    else:
        weights = sum(_safetensors_numel(f) for f in sorted(path.glob("*.safetensors"))) * elem
        if weights == 0:  # e.g. pytorch_model.bin: the file size is the fp32 size
            weights = sum(f.stat().st_size for f in path.glob("*.bin"))
        config = path / "config.json"
        dims = json.loads(config.read_text()) if config.exists() else {}
        if "head_dim" not in dims and dims.get("num_attention_heads"):
            dims["head_dim"] = dims["hidden_size"] // dims["num_attention_heads"]
    kv = kv_cache_bytes(cfg, dims, _kv_element_bytes(cfg, device, elem)) if cfg.task == "chat" else 0
    return int((weights + kv) * (1 + OVERHEAD))


def kv_cache_bytes(cfg: ModelConfig, dims: dict[str, Any], elem: int) -> int:
    """The configured KV reservation if the config names one, else a slot per sequence at full length."""
    configured = getattr(cfg, "kv_cache_bytes", None)
    if configured:
        return int(configured)
    layers = int(dims.get("num_hidden_layers") or 0)
    kv_heads = int(dims.get("num_key_value_heads") or dims.get("num_attention_heads") or 0)
    head_dim = int(dims.get("head_dim") or 0)
    return 2 * layers * kv_heads * head_dim * cfg.max_num_seqs * cfg.max_model_len * elem


def _kv_element_bytes(cfg: ModelConfig, device: str, activation_bytes: int) -> int:
    """Bytes per KV-cache element, by the engine's own rule (engine/kv_cache.cache_dtype)."""
    try:
        import torch

        from budrt.engine.kv_cache import cache_dtype

        activations = {4: torch.float32, 2: torch.bfloat16}.get(activation_bytes, torch.float32)
        return int(cache_dtype(cfg.kv_cache_dtype, activations, torch.device(device)).itemsize)
    except Exception:  # an inconsistent config fails at load, with its reason: assume the larger
        return max(activation_bytes, _DTYPE_BYTES.get(cfg.kv_cache_dtype, 0))


def _element_bytes(cfg: ModelConfig, device: str = "cpu") -> int:
    if cfg.task != "chat":
        return 4  # embedding models run in float32
    if cfg.dtype != "auto":
        return _DTYPE_BYTES[cfg.dtype]
    if device.startswith("cuda"):
        return 2  # bf16, or fp16 on cards without bf16 (engine/device.py)
    try:
        from budrt.engine.factory import auto_dtype

        return int(auto_dtype().itemsize)
    except Exception:  # the engine may not expose it: assume the larger
        return 4


def _diffusers_numel(path: Path) -> int:
    """Weights of a pipeline directory's components, plus a text encoder it names by source
    (budrt's demo pipeline reads the embedding model's package rather than a copy)."""
    total = sum(_safetensors_numel(f) for f in sorted(path.glob("*/*.safetensors")))
    index = json.loads((path / "model_index.json").read_text())
    source = index.get("text_encoder_source")
    if isinstance(source, str):
        total += sum(_safetensors_numel(f) for f in sorted(resolve_source(source).glob("*.safetensors")))
    return total


def _safetensors_numel(file: Path) -> int:
    with file.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        total += (end - start) // _ST_BYTES.get(info["dtype"], 4)
    return total


# --- a minimal GGUF key/value reader (the gguf package parses the whole file: seconds) ---

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: Path) -> dict[str, Any]:
    """Scalar key/values of a GGUF file (arrays such as the vocabulary are skipped)."""
    out: dict[str, Any] = {}
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        cursor = _Cursor(mapped)
        magic, _version, _tensors, count = cursor.unpack("<4sIQQ")
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        for _ in range(count):
            key = cursor.string()
            (vtype,) = cursor.unpack("<I")
            value = cursor.value(vtype)
            if value is not None:
                out[key] = value
    return out


class _Cursor:
    """Reads a GGUF header in place (a mapped file): skipping SmolLM2's ~100k vocabulary and merge
    strings this way took ~0.03 s, reading them through a file object ~0.13 s of a model's load."""

    _LENGTH = struct.Struct("<Q")

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        self.pos += n
        return self.buffer[self.pos - n : self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<IQ")
            if etype == _STRING:
                length, pos = self._LENGTH.unpack_from, self.pos
                for _ in range(n):
                    pos += 8 + length(self.buffer, pos)[0]
                self.pos = pos
            elif etype in _SCALARS:
                self.pos += n * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(n):
                    self.value(etype)
            return None
        (value,) = self.unpack("<" + _SCALARS[vtype])
        return value
