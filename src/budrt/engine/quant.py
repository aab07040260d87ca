"""A GGUF's own quantized weights (Q4_0 / Q4_1 linears, a Q8_0 lm_head), kept as they are for
small decode steps.

Decoding one stream on a CPU is bound by reading the weights: in fp32 SmolLM2's linears are
~430 MB per step, in bf16 ~215 MB, in 4 bits ~60 MB. GGUF Q4_1 stores each row in groups of 32 as
`w = q * d + m` (q in 0..15); Q4_0 as `w = (q - 8) * d`. The 4-bit values and the fp16 d and m are
the file's, not a requantization: `pack_tiles` only lays them out as tiles of 16 output rows for
csrc/q4_linear.cpp, which takes them through int8 dot products (AVX2 `maddubs`, AVX512-VNNI
`vpdpbusd`): each 32-input block of the activations is split into two int8 roundings (the second
of the first's remainder, so the activations keep more precision than bf16).

Q8_0 (`w = q * d`, q int8) is how the file stores SmolLM2's token embedding, which is also its
lm_head: 30 MB against 57 MB in bf16, read by csrc/q8_linear.cpp as stored.

Kept in the gguf cache's safetensors next to the dequantized weights, in the form the kernels
read: `<name>.q4_tiles` (uint8) and `.q4_dm` (fp16) as `pack_tiles` lays them out (a restart then
packs nothing and reads half the bytes of one value per byte); a weight whose rows do not fill
tiles as `<name>.q4_values` (uint8, one value per byte), `.q4_scales` and `.q4_mins` (fp32,
`[out, in / 32]`); a Q8_0 one as `<name>.q8_values` (int8) and `.q8_scales` (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType

GROUP = 32
SUFFIXES = (".q4_values", ".q4_scales", ".q4_mins")
Q8_SUFFIXES = (".q8_values", ".q8_scales")
TILES_SUFFIXES = (".q4_tiles", ".q4_dm")
STORED_SUFFIXES = (*SUFFIXES, *Q8_SUFFIXES, *TILES_SUFFIXES)  # every part of a small copy


@dataclass
class Q4Weight:
    values: torch.Tensor  # uint8 [out, in], each 0..15
    scales: torch.Tensor  # fp32 [out, in / 32]
    mins: torch.Tensor  # fp32 [out, in / 32]: w = values * scale + min

    def dequantize(self) -> torch.Tensor:
        out, inp = self.values.shape
        grouped = self.values.float().view(out, inp // GROUP, GROUP)
        return (grouped * self.scales[..., None] + self.mins[..., None]).view(out, inp)

    def map_rows(self, fn) -> Q4Weight:  # type: ignore[no-untyped-def]
        """Apply a row permutation (e.g. llama.cpp's Q/K unpermute) to every part alike."""
        return Q4Weight(fn(self.values), fn(self.scales), fn(self.mins))

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        parts = (self.values, self.scales, self.mins)
        return {name + suffix: part.contiguous() for suffix, part in zip(SUFFIXES, parts, strict=True)}


@dataclass
class Q8Weight:
    values: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # fp32 [out, in / 32]: w = values * scale

    def dequantize(self) -> torch.Tensor:
        out, inp = self.values.shape
        return (self.values.float().view(out, inp // GROUP, GROUP) * self.scales[..., None]).view(out, inp)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The dequantized rows `ids` (fp32, `[*ids.shape, in]`): `dequantize()[ids]`, same bits."""
        inp = self.values.shape[1]
        values = self.values[ids].float().view(*ids.shape, inp // GROUP, GROUP)
        return (values * self.scales[ids][..., None]).view(*ids.shape, inp)

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        parts = (self.values, self.scales)
        return {name + suffix: part.contiguous() for suffix, part in zip(Q8_SUFFIXES, parts, strict=True)}


def q8_from_gguf(data: np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, int]) -> Q8Weight | None:
    """The Q8_0 blocks of a GGUF tensor (fp16 d, then 32 int8 values), or None for any other type."""
    if kind != GGMLQuantizationType.Q8_0:
        return None
    out, inp = shape
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(out, inp // GROUP, 2 + GROUP)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    values = blocks[..., 2:].copy().view(np.int8).reshape(out, inp)
    return Q8Weight(torch.from_numpy(values), torch.from_numpy(d))


class Q4Tiles(NamedTuple):
    """A Q4 weight laid out for csrc/q4_linear.cpp by `pack_tiles`."""

    packed: torch.Tensor  # uint8 [out * in / 2]
    dm: torch.Tensor  # fp16 [out / 16, in / 32, 2, 16]

    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {name + suffix: part for suffix, part in zip(TILES_SUFFIXES, self, strict=True)}


SmallWeight = Q4Weight | Q4Tiles | Q8Weight  # a linear's small copy: as the file stores it, or tiled


def from_gguf(data: np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, int]) -> Q4Weight | None:
    """The Q4 blocks of a GGUF tensor (`data`: its raw bytes, one row per output), or None for
    any other type."""
    if kind == GGMLQuantizationType.Q4_1:
        header = 4  # fp16 d, fp16 m
    elif kind == GGMLQuantizationType.Q4_0:
        header = 2  # fp16 d
    else:
        return None
    out, inp = shape
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(out, inp // GROUP, header + GROUP // 2)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., header:]
    # Within a block, element j < 16 is the low nibble of byte j and element j + 16 its high one.
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(out, inp)
    if kind == GGMLQuantizationType.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        m = -8.0 * d
    return Q4Weight(torch.from_numpy(values), torch.from_numpy(d), torch.from_numpy(np.asarray(m)))


def split(weights: dict[str, torch.Tensor]) -> dict[str, SmallWeight]:
    """Remove the `.q4_*` and `.q8_*` entries from a state dict; returns them by weight name."""
    found: dict[str, SmallWeight] = {}
    for key in [k for k in weights if k.endswith((SUFFIXES[0], Q8_SUFFIXES[0], TILES_SUFFIXES[0]))]:
        if key.endswith(TILES_SUFFIXES[0]):
            base = key.removesuffix(TILES_SUFFIXES[0])
            packed, dm = (weights.pop(base + s) for s in TILES_SUFFIXES)
            found[base] = Q4Tiles(packed.to(torch.uint8), dm.to(torch.float16))
        elif key.endswith(SUFFIXES[0]):
            base = key.removesuffix(SUFFIXES[0])
            values, scales, mins = (weights.pop(base + s) for s in SUFFIXES)
            found[base] = Q4Weight(values.to(torch.uint8), scales.float(), mins.float())
        else:
            base = key.removesuffix(Q8_SUFFIXES[0])
            values, scales = (weights.pop(base + s) for s in Q8_SUFFIXES)
            found[base] = Q8Weight(values.to(torch.int8), scales.float())
    return found


def concat(parts: list[Q4Weight | None]) -> Q4Weight | None:
    """Stack along the output dimension (fused q/k/v, gate/up); None unless every part has one."""
    if any(p is None for p in parts):
        return None
    return Q4Weight(
        torch.cat([p.values for p in parts]),  # type: ignore[union-attr]
        torch.cat([p.scales for p in parts]),  # type: ignore[union-attr]
        torch.cat([p.mins for p in parts]),  # type: ignore[union-attr]
    )


TILE = 16  # output rows per tile of `pack_tiles`: one per vector lane of the kernel


def pack_tiles(q4: Q4Weight) -> Q4Tiles:
    """(packed uint8 `[N * K / 2]`, dm fp16 `[N / 16, K / 32, 2, 16]`) for `q4_tiles_linear`.

    Per tile of 16 output rows and block of 32 inputs: 4 x 64 bytes, byte `(l, row, j)` holding
    input `4l + j` in its low nibble and input `16 + 4l + j` in its high one; then the 16 rows'
    d and their 16 m."""
    out, inp = q4.values.shape
    v = q4.values.view(out // TILE, TILE, inp // GROUP, 2, 4, 4)  # tile, row, block, half, l, j
    packed = (v[:, :, :, 0] | (v[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).contiguous().view(-1)

    def tiled(part: torch.Tensor) -> torch.Tensor:  # [out, blocks] -> [tiles, blocks, 16]
        return part.view(out // TILE, TILE, inp // GROUP).transpose(1, 2)

    dm = torch.stack([tiled(q4.scales), tiled(q4.mins)], dim=2).to(torch.float16).contiguous()
    return Q4Tiles(packed, dm)


def fits(q4: Q4Weight) -> bool:
    return q4.values.shape[0] % TILE == 0
