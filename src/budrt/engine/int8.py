"""Int8 linears through FBGEMM, for the compute-bound steps (prompt chunks, batched decode) of
GGUF models running in fp32 on CPUs without bf16 dot products.

On such CPUs (AVX2, e.g. the AMD EPYC of issue 16) an fp32 matmul does 8 multiply-adds per
instruction; FBGEMM's int8 kernels (`maddubs`/`madd`) do 32 per two. Measured on SmolLM2's
shapes with 2 threads, row quantization included (bench/int8_linear_bench.py): a step's linears
2.0x fp32's speed at 32 rows, 1.8x at 64, 1.3x at 1,024; the weights take a quarter of fp32's
bytes in the packed form (FBGEMM also keeps the unpacked int8 copy). The file's weights were 4-
or 8-bit already: these are its dequantized values, rounded once more to int8 per output row.

Activations are quantized per row (csrc/quantize_rows.cpp) to `LEVELS` steps either side of
zero and handed to FBGEMM as exact integers with scale 1 and zero point `LEVELS + 1`: every row's
result depends on its own values only (integer sums are exact in any order), so a seeded row gets
the same bits whatever shares its step, at any row count. 7-bit rather than 8-bit because AVX2's
`maddubs` adds two u8 x s8 products in a saturating int16: 127 * 127 * 2 fits, 255 * 127 * 2 does
not. A few large channels would leave the rest of a row few levels, so inputs and weights are
both rotated by a blockwise Hadamard matrix first (orthonormal: the product is unchanged), which
spreads those channels over their block: 4.4% error per product on SmolLM2's activations
without it, 1.8% with it.
"""

from __future__ import annotations

import warnings

import torch

from budrt.engine import kernels

LEVELS = 63  # activations round to -63..63 times their row's scale: u8 1..127 for FBGEMM
_ZERO_POINT = LEVELS + 1
MAX_BLOCK = 64  # Hadamard block: wider blocks measured no better on SmolLM2 (1.74% vs 1.77%)


def available() -> bool:
    """Whether this torch build has FBGEMM (x86 with AVX2)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def hadamard_block(width: int) -> int:
    """The rotation's block for `width` inputs: the largest power of 4 dividing it, at most
    `MAX_BLOCK` (its 1/sqrt(block) is then exact)."""
    block = 1
    while block * 4 <= MAX_BLOCK and width % (block * 4) == 0:
        block *= 4
    return block


class Int8Weight:
    """A weight `[out, in]`, Hadamard-rotated by blocks of its inputs, rounded to int8 per output
    row and packed once for FBGEMM."""

    def __init__(self, weight: torch.Tensor) -> None:
        weight = weight.detach().float().contiguous()
        self.out_features, self.in_features = weight.shape
        self.block = hadamard_block(self.in_features)
        # Rotated and rounded per output row by the kernel that rotates the activations: the same
        # transform on both sides, in one pass (5x faster at load than torch's ops).
        levels, scales = kernels.quantize_rows(weight, self.block, 127)
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"  # the packed object keeps its kernels
        try:
            with warnings.catch_warnings():  # torch marks its eager quantization API as legacy
                warnings.simplefilter("ignore")
                quantized = torch._make_per_channel_quantized_tensor(
                    levels.to(torch.int8), scales.view(-1).double(), zero_points, 0
                )
                self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        finally:
            torch.backends.quantized.engine = engine

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x `[rows, in]` (fp32, contiguous) times the weight: `[rows, out]` fp32."""
        levels, scales = kernels.quantize_rows(x, self.block, LEVELS)
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            levels, 1.0, _ZERO_POINT, self.packed
        )
        return out.mul_(scales)
