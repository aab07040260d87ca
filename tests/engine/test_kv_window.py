"""The decode fast path's cache view equals the gather it replaces, and the RoPE rewrite equals
transformers' rotate_half form bit for bit."""

from __future__ import annotations

import torch

from budrt.engine.kv_cache import KVCache
from budrt.engine.llama import RotaryEmbedding, apply_rope


def test_window_equals_gather() -> None:
    torch.manual_seed(0)
    cache = KVCache(2, 10, 4, 3, 8, torch.float32)
    cache.data.normal_()
    slots = torch.tensor([13, 14])
    k, v = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    cache.write(1, slots, k, v)
    for first, length in [(3, 11), (0, 4), (2, 1)]:
        blocks = (length + 3) // 4
        table = torch.arange(first, first + blocks).unsqueeze(0)
        gk, gv = cache.gather(1, table, length)
        wk, wv = cache.window(1, first, length)
        assert torch.equal(gk, wk) and torch.equal(gv, wv)
        assert wk.shape == (1, 3, length, 8)
    gk, gv = cache.gather(1, torch.tensor([[3, 0], [4, 5]]), 6)  # two rows with their own blocks
    assert gk.shape == (2, 3, 6, 8)
    # Slots 13 and 14 are block 3, offsets 1 and 2: the first row's positions 1 and 2.
    assert torch.equal(gk[0, :, 1:3], k.transpose(0, 1)) and torch.equal(gv[0, :, 1:3], v.transpose(0, 1))
    assert torch.equal(gk[1, :, 4:6], cache.data[1, 0, 5, :2].transpose(0, 1))


def test_rope_matches_rotate_half() -> None:
    torch.manual_seed(0)
    rotary = RotaryEmbedding(16, 10000.0, 64)
    positions = torch.tensor([0, 5, 63])
    x = torch.randn(3, 4, 16)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    emb = torch.outer(positions.float(), inv_freq).repeat(1, 2)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
    rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)  # transformers' rotate_half
    expected = x * cos + rotated * sin
    got = apply_rope(x, *rotary(positions, torch.float32))
    assert torch.equal(got, expected)
    xb, cb, sb = x.bfloat16(), cos.bfloat16(), sin.bfloat16()  # the sign flip is exact in bf16 too
    rb = torch.cat((-xb[..., 8:], xb[..., :8]), dim=-1)
    assert torch.equal(apply_rope(xb, *rotary(positions, torch.bfloat16)), xb * cb + rb * sb)
