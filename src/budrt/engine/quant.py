"""A GGUF's own quantized weights (Q4_0 / Q4_1 linears, a Q8_0 lm_head), kept as they are for
small decode steps.

Decoding one stream on a CPU is bound by reading the weights: in bf16 SmolLM2's linears are
~270 MB per step, in 4 bits ~70 MB. GGUF Q4_1 stores each row in groups of 32 as
`w = q * d + m` (q in 0..15); Q4_0 as `w = (q - 8) * d`. PyTorch's CPU int4 matmul
(`_weight_int4pack_mm_for_cpu`, groups along the input dimension) computes
`w = (q - 8) * scale + zero`, so the file's blocks map onto it: scale = d, zero = m + 8d (Q4_1)
or 0 (Q4_0). The 4-bit values are the file's, not a requantization; the kernel takes scale and
zero in the activations' dtype, so in bf16 they lose the last bits of the file's fp16.

Where the C++ kernels are loaded (csrc/q4_linear.cpp: AVX2+FMA+F16C or AVX512-VNNI builds),
`pack` lays the blocks out as tiles of 16 output rows instead (`pack_tiles`), and `matmul` takes
them through int8 dot products: each 32-input block of the activations is split into two int8
roundings (the second of the first's remainder, so the activations keep more precision than
bf16), and the file's fp16 d and m are kept exactly. With AVX512-VNNI at 1-8 rows that is
0.6-0.9x the int4 kernel's time, with a smaller error against the exact product (random weights:
0.17% vs 0.24%). ATen's layout remains for builds without the kernels.

Q8_0 (`w = q * d`, q int8) is how the file stores SmolLM2's token embedding, which is also its
lm_head: 30 MB against 57 MB in bf16, read by csrc/q8_linear.cpp as stored.

Kept in the gguf cache's safetensors next to the dequantized weights under `<name>.q4_values`
(uint8, one value per byte), `.q4_scales` and `.q4_mins` (fp32, `[out, in / 32]`), or
`<name>.q8_values` (int8) and `.q8_scales` (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from budrt.engine import kernels

GROUP = 32
SUFFIXES = (".q4_values", ".q4_scales", ".q4_mins")
Q8_SUFFIXES = (".q8_values", ".q8_scales")


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


def split(weights: dict[str, torch.Tensor]) -> dict[str, Q4Weight | Q8Weight]:
    """Remove the `.q4_*` and `.q8_*` entries from a state dict; returns them by weight name."""
    found: dict[str, Q4Weight | Q8Weight] = {}
    for key in [k for k in weights if k.endswith((SUFFIXES[0], Q8_SUFFIXES[0]))]:
        if key.endswith(SUFFIXES[0]):
            base = key.removesuffix(SUFFIXES[0])
            values, scales, mins = (weights.pop(base + s) for s in SUFFIXES)
            found[base] = Q4Weight(values.to(torch.uint8), scales.float(), mins.float())
        else:
            base = key.removesuffix(Q8_SUFFIXES[0])
            values, scales = (weights.pop(base + s) for s in Q8_SUFFIXES)
            found[base] = Q8Weight(values.to(torch.int8), scales.float())
    return found


def attach(model: nn.Module, quantized: dict[str, Q4Weight | Q8Weight]) -> None:
    """Hang each quantized copy on its `nn.Linear` (as `.q4` or `.q8`) for fusing and packing
    later. An embedding's copy goes to the lm_head that shares its weight (tied embeddings)."""
    modules = dict(model.named_modules())
    lm_head = modules.get("lm_head")
    for name, copy in quantized.items():
        module = modules.get(name.removesuffix(".weight"))
        tied = isinstance(lm_head, nn.Linear) and lm_head.weight is getattr(module, "weight", None)
        if isinstance(module, nn.Embedding) and tied:
            module = lm_head
        if isinstance(module, nn.Linear):
            setattr(module, "q4" if isinstance(copy, Q4Weight) else "q8", copy)


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


def pack_tiles(q4: Q4Weight) -> tuple[torch.Tensor, torch.Tensor]:
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
    return packed, dm


def fits(q4: Q4Weight) -> bool:
    return q4.values.shape[0] % TILE == 0


def pack(q4: Q4Weight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit weights as `matmul` takes them: tiles (`pack_tiles`) where that kernel is built,
    else `_weight_int4pack_mm_for_cpu`'s (packed weight, scales_and_zeros `[groups, out, 2]` in
    `dtype`). Both take output rows in groups of 16 (`fits`)."""
    if kernels.q4_tiles_available():
        return pack_tiles(q4)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.values.to(torch.int32).contiguous(), 1)
    zeros = q4.mins + 8 * q4.scales
    scales_and_zeros = torch.stack([q4.scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()
    return packed, scales_and_zeros


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ W^T on weights from `pack` (tiles are one flat tensor)."""
    if packed.dim() == 1:
        return kernels.q4_tiles_linear(x.contiguous(), packed, scales)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales)
