"""The KV cache: one fixed slot per running sequence.

Per layer, keys and values live in `[num_slots, num_kv_heads, max_model_len, head_dim]` tensors that
are allocated once, so a step never allocates cache memory. A sequence owns one slot from admission
to finish. This is the seam a paged cache (blocks + prefix caching) replaces: the model only calls
`write_prefill`, `write_decode` and `gather`, and the scheduler only `allocate`/`free`.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_model_len: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_slots, num_kv_heads, max_model_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        # Lowest slot first keeps the running batch packed at the front of the cache.
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    # --- slot bookkeeping (scheduler side) ---

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"KV slot {slot} freed twice")
        self._free.append(slot)

    # --- tensor access (model side) ---

    def write_prefill(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a whole prompt's keys/values (`[kv_heads, T, head_dim]`) at positions 0..T-1."""
        length = k.shape[1]
        self.keys[layer][slot, :, :length] = k
        self.values[layer][slot, :, :length] = v

    def write_decode(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store one new token per sequence (`[B, kv_heads, head_dim]`) at its own position."""
        self.keys[layer][slots, :, positions] = k
        self.values[layer][slots, :, positions] = v

    def gather(
        self, layer: int, slots: torch.Tensor, kv_len: int, packed: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values `[B, kv_heads, kv_len, head_dim]` of the given slots.

        `packed` means the slots are exactly 0..B-1 (common: slots are handed out lowest first);
        then this is a view instead of a copy.
        """
        if packed:
            n = slots.shape[0]
            return self.keys[layer][:n, :, :kv_len], self.values[layer][:n, :, :kv_len]
        return self.keys[layer][slots, :, :kv_len], self.values[layer][slots, :, :kv_len]

    def used_tokens(self, lengths: list[int]) -> float:
        """Fraction of all token positions in the cache that hold a live sequence's entries."""
        return sum(lengths) / (self.num_slots * self.max_model_len)
