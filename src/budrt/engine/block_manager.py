"""Which KV-cache blocks each sequence owns, and the automatic prefix cache.

The cache is split into fixed-size blocks of `block_size` token positions. A sequence's
`block_table` lists its blocks in order, so token position `p` lives in block
`block_table[p // block_size]` at offset `p % block_size`.

Prefix caching: every *full* block is named by a chain hash (parent block's hash + its token ids +
the model's identity), so two sequences whose first k blocks hold the same tokens can share those
blocks (reference counted). A block whose last user finished keeps its contents and its hash in
the free list; it is reused by a later prompt with the same prefix, or evicted in LRU order when a
fresh block is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from budrt.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set for full blocks (when prefix caching is on)
    token_ids: tuple[int, ...] = field(default_factory=tuple)
    computed: bool = False  # its KV entries are written; only then may a hit skip computing it


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, identity: str) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache has no blocks: raise kv_cache_bytes")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.identity = identity
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first: allocation evicts from the front.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _chain_hash(self, parent: int | None, tokens: tuple[int, ...], seeded: bool = False) -> int:
        # A seeded request's prompt is computed row by row (runner.py) so that a seed gives the same
        # output whatever else runs; other prompts' blocks round differently, so the two kinds of
        # blocks are never shared (seeded ones are, among themselves: n > 1, repeated prompts).
        return hash((parent, self.identity, seeded, tokens))

    def _take_free(self, block_id: int) -> Block:
        """Take a specific free block (a prefix-cache hit) or the LRU one (block_id = -1)."""
        if block_id < 0:
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]  # evicted: its old contents are gone
            block.hash, block.token_ids, block.computed = None, (), False
        else:
            del self.free[block_id]
            block = self.blocks[block_id]
        block.ref_count = 1
        return block

    def can_allocate(self, seq: Sequence) -> bool:
        # Conservative: prefix hits would need fewer fresh blocks, but hits on free blocks also
        # consume free-list entries, so the full count is the safe bound.
        return self.blocks_needed(seq.num_tokens) <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        tokens = seq.token_ids
        parent: int | None = None
        cached = 0
        miss = not self.enable_prefix_caching
        seeded = seq.params.seed is not None
        for i in range(self.blocks_needed(len(tokens))):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            full = len(chunk) == self.block_size
            h = self._chain_hash(parent, chunk, seeded) if full and self.enable_prefix_caching else None
            block_id = self.hash_to_block.get(h, -1) if (h is not None and not miss) else -1
            if block_id >= 0 and self.blocks[block_id].token_ids != chunk:
                block_id = -1  # hash collision
            if block_id >= 0:
                block = self.blocks[block_id]
                if block.ref_count > 0:
                    block.ref_count += 1  # shared with a running sequence (e.g. n > 1)
                else:
                    block = self._take_free(block_id)
                # A block another sequence is still computing is shared but computed again here
                # (same tokens, same positions: the same values), so no position is read unwritten.
                if block.computed and cached == i * self.block_size:
                    cached += self.block_size
            else:
                miss = True
                block = self._take_free(-1)
                if h is not None:
                    block.hash, block.token_ids = h, chunk
                    self.hash_to_block[h] = block.block_id
            seq.block_table.append(block.block_id)
            parent = h
        if self.enable_prefix_caching:
            self.prefix_queries += len(tokens)
            self.prefix_hits += cached
        # At least the last token is computed again: its logits pick the next token. Rewriting
        # its KV entry in a shared block stores the same values.
        seq.num_computed_tokens = min(cached, len(tokens) - 1)
        seq.num_cached_tokens = cached

    def deallocate(self, seq: Sequence) -> None:
        # Reverse order: a prefix's tail is evicted before its head, which more prompts share.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if not block.computed:  # nothing reusable in it
                    if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                        del self.hash_to_block[block.hash]
                    block.hash, block.token_ids = None, ()
                self.free[block_id] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_sealed_blocks = 0

    def blocks_short(self, seq: Sequence) -> int:
        """Fresh blocks a running sequence needs before its newest token can be computed."""
        return max(0, self.blocks_needed(seq.num_tokens) - len(seq.block_table))

    def append_slots(self, seq: Sequence) -> None:
        """Make room for the token about to be computed (the sequence's last, not yet in cache)."""
        while len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take_free(-1).block_id)

    def seal_full_blocks(self, seq: Sequence) -> None:
        """Mark the blocks whose KV entries are now all written as reusable by later prompts."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        parent: int | None = None
        for i in range(seq.num_sealed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if i > 0:
                parent = self.blocks[seq.block_table[i - 1]].hash
            if block.hash is None:  # a block filled by decoding
                chunk = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
                block.hash, block.token_ids = (
                    self._chain_hash(parent, chunk, seq.params.seed is not None),
                    chunk,
                )
                self.hash_to_block.setdefault(block.hash, block.block_id)
            block.computed = True
        seq.num_sealed_blocks = max(seq.num_sealed_blocks, num_full)
