"""Putting a built model on its device: dtype, weights and KV-cache size on CUDA.

The model is built and fused on the CPU (the loaders read files into CPU tensors); on CUDA it is
then moved whole in bf16 (fp16 on cards without bf16). The CPU-only weight forms (oneDNN packing,
the GGUF's small copies: engine/linear.py) are never built for it.
"""

from __future__ import annotations

import torch
from torch import nn

from budrt.engine.kv_cache import bytes_per_block
from budrt.engine.llama import LlamaArgs


def cuda_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the card computes it (Ampere and later), else fp16."""
    with torch.cuda.device(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move `model` (already in its serving dtype) to a non-CPU `device`; no-op on CPU."""
    return model if device.type == "cpu" else model.to(device)


def fit_kv_blocks(
    num_blocks: int,
    args: LlamaArgs,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    utilization: float = 0.9,
) -> int:
    """On CUDA, `num_blocks` (the configured `kv_cache_bytes`) capped by what is left of
    `utilization` of the card once the weights are loaded; unchanged on CPU.

    The configured reservation is what the server's placement accounted for, so it is the target;
    free memory only caps it (other models or processes on the card).
    """
    if device.type != "cuda":
        return num_blocks
    per_block = bytes_per_block(args.num_layers, args.num_kv_heads, args.head_dim, block_size, dtype)
    free, total = torch.cuda.mem_get_info(device)
    room = int(total * utilization) - (total - free)
    return max(min(num_blocks, room // per_block), 0)
