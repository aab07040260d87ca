"""Int8 linears through FBGEMM, for the compute-bound steps (prompt chunks, batched decode) of
GGUF models running in fp32 on CPUs without bf16 dot products.

On such CPUs (AVX2, e.g. the AMD EPYC of issue 16) an fp32 matmul does 8 multiply-adds per
instruction; FBGEMM's int8 kernels (`maddubs`/`madd`) do 32 per two. Measured on SmolLM2's
shapes with 2 threads, row quantization included (bench/int8_linear_bench.py): a step's linears
2.0x fp32's speed at 32 rows, 1.8x at 64, 1.3x at 1,024; the weights take a quarter of fp32's
bytes in the packed form (FBGEMM also keeps the unpacked int8 copy). The file's weights were 4-
or 8-bit already: these are its dequantized values, rounded once more to int8 per output row.

Activations are quantized per row (csrc/quantize_rows.cpp) to `levels` steps either side of
zero and handed to FBGEMM as exact integers with scale 1 and zero point `levels + 1`: every row's
result depends on its own values only (integer sums are exact in any order), so a seeded row gets
the same bits whatever shares its step, at any row count. The levels follow the CPU
(`activation_levels`): 8-bit where FBGEMM multiplies with AVX512-VNNI, 7-bit elsewhere. A few
large channels would leave the rest of a row few levels, so inputs and weights are
both rotated by a blockwise Hadamard matrix first (orthonormal: the product is unchanged), which
spreads those channels over their block: 4.4% error per product on SmolLM2's activations
without it, 1.8% with it.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from budrt.engine import cpu_features, kernels, openmp

MAX_BLOCK = 64  # Hadamard block: wider blocks measured no better on SmolLM2 (1.74% vs 1.77%)


def available() -> bool:
    """Whether this torch build has FBGEMM (x86 with AVX2)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def activation_levels(features: cpu_features.CPUFeatures | None = None) -> int:
    """How many steps either side of zero a row of activations rounds to (u8 `1..2 x levels + 1`
    for FBGEMM). 127 where the CPU has AVX512-VNNI: FBGEMM's `vpdpbusd` sums u8 x s8 products in
    int32. 63 elsewhere: AVX2's `maddubs` adds two products in a saturating int16 (127 * 127 * 2
    fits, 255 * 127 * 2 does not). The 8 bits halve the rounding error (1.4% against 2.4% per
    product on SmolLM2's shapes), which decides near-ties: on a Xeon with VNNI, SmolLM2 answered
    "What is the capital of France?" with Paris at 127 levels and wrongly at 63."""
    features = features or cpu_features.detect()
    return 127 if features.avx512_vnni else 63


def hadamard_block(width: int) -> int:
    """The rotation's block for `width` inputs: the largest power of 4 dividing it, at most
    `MAX_BLOCK` (its 1/sqrt(block) is then exact)."""
    block = 1
    while block * 4 <= MAX_BLOCK and width % (block * 4) == 0:
        block *= 4
    return block


class RoundedWeight(NamedTuple):
    """A weight `[out, in]` Hadamard-rotated by blocks of its inputs and rounded per output row:
    int8 `levels` `[out, in]` times fp32 `scales` `[out, 1]`. The gguf cache stores it
    (server/gguf_cache.py), so a restart reads it instead of rounding fp32 weights again."""

    levels: torch.Tensor
    scales: torch.Tensor


# Names of a rounded weight's tensors in a state dict: `<weight name><suffix>`.
SUFFIXES = (".int8_levels", ".int8_scales")
# What the stored rounding depends on: a cache written under another is not read (gguf_cache).
FORMAT = f"hadamard{MAX_BLOCK}-127"


def round_weight(weight: torch.Tensor) -> RoundedWeight:
    """`weight` rotated and rounded per output row by the kernel that rotates the activations: the
    same transform on both sides, in one pass (5x faster at load than torch's ops)."""
    weight = weight.detach().float().contiguous()
    levels, scales = kernels.quantize_rows(weight, hadamard_block(weight.shape[1]), 127)
    return RoundedWeight(levels.to(torch.int8), scales)


def to_tensors(rounded: RoundedWeight, name: str) -> dict[str, torch.Tensor]:
    """The state-dict entries of `name`'s rounded form."""
    return {name + SUFFIXES[0]: rounded.levels, name + SUFFIXES[1]: rounded.scales}


def split(weights: dict[str, torch.Tensor]) -> dict[str, RoundedWeight]:
    """Remove the rounded forms from a state dict; returns them by weight name."""
    bases = [k.removesuffix(SUFFIXES[0]) for k in weights if k.endswith(SUFFIXES[0])]
    return {
        base: RoundedWeight(weights.pop(base + SUFFIXES[0]).to(torch.int8), weights.pop(base + SUFFIXES[1]))
        for base in bases
    }


def concat(parts: list[RoundedWeight | None]) -> RoundedWeight | None:
    """Stack along the output rows (fused q/k/v, gate/up): rows are rounded independently and the
    parts share their inputs, so this equals rounding the fused weight. None unless all have one."""
    if any(p is None for p in parts):
        return None
    return RoundedWeight(
        torch.cat([p.levels for p in parts]),  # type: ignore[union-attr]
        torch.cat([p.scales for p in parts]),  # type: ignore[union-attr]
    )


# FBGEMM packs a weight on one thread in time growing faster than its rows beyond a few thousand
# (SmolLM2's 49,152-row lm_head: 0.33 s, against 16 ms for 6,144 rows), so larger weights are
# packed in pieces of at most this many output rows, spread over the pool's threads: the lm_head
# in 0.07 s on 2 threads, the same bits, its products ~0.4-1 ms slower (1-64 rows, Xeon).
PIECE_ROWS = 6144


class Int8Weight:
    """A rounded weight (`RoundedWeight`), packed once for FBGEMM (`pack`) in pieces of at most
    `PIECE_ROWS` output rows; its inputs are rounded to `levels` steps either side of zero
    (`activation_levels`)."""

    def __init__(self, pieces: list[torch.ScriptObject], rounded: RoundedWeight, levels: int) -> None:
        self.pieces = pieces
        self.out_features, self.in_features = rounded.levels.shape
        self.block = hadamard_block(self.in_features)
        self.levels = levels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x `[rows, in]` (fp32, contiguous) times the weight: `[rows, out]` fp32."""
        levels, scales = kernels.quantize_rows(x, self.block, self.levels)
        parts = [
            torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                levels, 1.0, self.levels + 1, piece
            )
            for piece in self.pieces
        ]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out.mul_(scales)


def pack(weights: list[RoundedWeight], threads: int = 1) -> list[Int8Weight]:
    """`weights` packed for FBGEMM, on `threads` threads. FBGEMM packs one weight on one thread,
    and packing was half of SmolLM2's load once the gguf cache stored the rounded weights: 2
    threads took its 121 weights from ~1.0 to ~0.65 s (2 cores), pieces (`PIECE_ROWS`) to ~0.33 s."""
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"  # the packed objects keep its kernels
    levels = activation_levels()
    pieces = [_pieces(w) for w in weights]
    flat = [piece for parts in pieces for piece in parts]
    try:
        with warnings.catch_warnings():  # torch marks its eager quantization API as legacy
            warnings.simplefilter("ignore")
            if threads <= 1 or len(flat) <= 1:
                packed = iter([_pack_one(piece) for piece in flat])
            else:
                with ThreadPoolExecutor(threads) as pool:
                    packed = iter(list(pool.map(openmp.released(_pack_one), flat)))
    finally:
        torch.backends.quantized.engine = engine
    return [
        Int8Weight([next(packed) for _ in parts], w, levels) for parts, w in zip(pieces, weights, strict=True)
    ]


def _pieces(rounded: RoundedWeight) -> list[RoundedWeight]:
    rows = rounded.levels.shape[0]
    return [
        RoundedWeight(rounded.levels[i : i + PIECE_ROWS], rounded.scales[i : i + PIECE_ROWS])
        for i in range(0, rows, PIECE_ROWS)
    ]


def _pack_one(rounded: RoundedWeight) -> torch.ScriptObject:
    zero_points = torch.zeros(rounded.levels.shape[0], dtype=torch.long)
    scales = rounded.scales.view(-1).double()
    quantized = torch._make_per_channel_quantized_tensor(rounded.levels, scales, zero_points, 0)
    return torch.ops.quantized.linear_prepack(quantized, None)
