"""The paged KV cache: one preallocated tensor of fixed-size blocks for every layer's keys/values.

Layout `[num_layers, 2 (k/v), num_blocks, block_size, num_kv_heads, head_dim]`. Which blocks belong
to which sequence is the `BlockManager`'s business; the model only writes the new tokens' entries
at their slots (`block * block_size + offset`) and gathers a sequence's blocks to attend over them.
The size comes from a byte budget (CPU) or from free device memory (CUDA), never from the number
of sequences, so short requests leave room for many more of them.
"""

from __future__ import annotations

import math
import mmap

import torch

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF_WIDTH = (torch.bfloat16, torch.float16)


def cache_dtype(configured: str, activations: torch.dtype, device: torch.device) -> torch.dtype:
    """The cache's element type: `configured`, or for "auto" fp16 under fp32 activations on a CPU
    (as llama.cpp's default: half the bytes per token, so twice the tokens in the same budget and
    half the bytes a decode step's attention reads; scores and sums stay fp32) and the
    activations' own dtype elsewhere. The cache is the activations' dtype or 16-bit under fp32:
    the pairs the C++ kernels and `KVCache` convert between."""
    if configured == "auto":
        return torch.float16 if device.type == "cpu" and activations == torch.float32 else activations
    dtype = CACHE_DTYPES[configured]
    if dtype != activations and not (activations == torch.float32 and dtype in HALF_WIDTH):
        raise ValueError(
            f"kv_cache_dtype {configured} under {str(activations).removeprefix('torch.')} activations: "
            "the cache holds the activations' dtype, or bfloat16/float16 under float32"
        )
    return dtype


def bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    return (
        num_layers * 2 * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    )


def num_blocks_for(
    budget_bytes: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    gpu_memory_utilization: float = 0.9,
) -> int:
    """Blocks that fit the budget: `budget_bytes` on CPU; on CUDA, what is left of
    `gpu_memory_utilization` of the card once the weights are loaded."""
    per_block = bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget_bytes = max(int(total * gpu_memory_utilization) - used, 0)
    return budget_bytes // per_block


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed tensor. On a CPU, fresh pages of an anonymous mapping, which the kernel zero-fills
    at their first use: writing zeros over SmolLM2's 720 MB cache took ~0.3 s of every start, and
    only the blocks in use count as resident."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes)  # the tensor keeps the mapping alive
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        # Zeroed, not empty: padded (masked) positions must hold finite numbers, or NaN garbage
        # would leak through the attention's masked scores.
        self.data = zeroed((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype, device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # Per-layer `[num_blocks * block_size, kv_heads, head_dim]` views, made once: slicing them
        # per call is a handful of ops per layer per step, which shows at batch 1.
        flat = self.data.view(num_layers, 2, -1, num_kv_heads, head_dim)
        self._keys = [flat[i, 0] for i in range(num_layers)]
        self._values = [flat[i, 1] for i in range(num_layers)]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values, `[num_blocks, block_size, kv_heads, head_dim]` each."""
        return self.data[layer, 0], self.data[layer, 1]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' entries (`[N, kv_heads, head_dim]`) at their slots (`[N]`),
        rounded to the cache's dtype."""
        self._keys[layer].index_copy_(0, slots, k.to(self.dtype))
        self._values[layer].index_copy_(0, slots, v.to(self.dtype))

    def gather(
        self, layer: int, block_tables: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of each row's blocks: `[B, kv_heads, length, head_dim]`,
        in the cache's dtype."""
        b = block_tables.shape[0]
        # One index_select on whole blocks of keys and values together: far cheaper than fancy
        # indexing, and half the per-layer calls of selecting keys and values apart.
        both = self.data[layer].view(2, self.num_blocks, -1).index_select(1, block_tables.view(-1))
        both = both.view(2, b, -1, self.num_kv_heads, self.head_dim)[:, :, :length]
        return both[0].transpose(1, 2), both[1].transpose(1, 2)

    def window(self, layer: int, first_block: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `gather` for one sequence whose blocks are consecutive from `first_block`: a view
        of the cache, `[1, kv_heads, length, head_dim]`, with no copy."""
        start = first_block * self.block_size
        k = self._keys[layer][start : start + length]
        v = self._values[layer][start : start + length]
        return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
