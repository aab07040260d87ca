"""Which weights and which code a step runs on, decided once per step by `PathRule.choose`.

A model keeps its linears' weights in up to two forms (engine/linear.py): the dense weights (fp32,
bf16 packed for oneDNN, or int8 for FBGEMM) and, for GGUF models on CPU, the file's own 4-bit
blocks (and a Q8_0 lm_head). Decoding a few streams is bound by reading the weights, so such steps
read the small copies; prompt chunks and larger batches are compute bound and read the dense ones.

The small copies round differently from the dense weights, so a row's logits depend on which form
computed it. A seeded request must give the same tokens whatever shares its step, so every step
with a seeded request reads the dense weights. fp32 and bf16 ones take `EXACT_ROWS` rows per call:
oneDNN rounds a row of some shapes (SmolLM2's fused q/k/v, the vocabulary projection) differently
above 32 rows than at 1 to 32, so a seeded row computed in a bigger step would not match the same
row computed alone. int8 ones take any number: each row is quantized on its own and summed in
integers (engine/int8.py).
"""

from __future__ import annotations

from dataclasses import dataclass

EXACT_ROWS = 32
# The Q8_0 lm_head serves steps of at most this many rows: above it, widening the 8-bit values
# costs more than the bytes saved (bf16, warm caches: 1 row 1.6 vs 1.9 ms, 8 rows 3.7 vs 2.5).
SMALL_LOGITS_ROWS = 4


def default_small_rows(dtype_name: str, dense_int8: bool = False) -> int:
    """The most rows a 4-bit step takes when the config leaves it open: where the dense weights
    start to win (`bench/step_ab.py --compare q4`). bf16 (oneDNN, AMX Xeon): 16 rows, 27.3 vs 32.6
    ms. fp32 (MKL, AVX2 EPYC): 32 rows, 132 vs 149 ms; 64 rows about even. fp32 with int8 dense
    weights (FBGEMM, AVX2 EPYC): 16 rows, 71.2 vs 73.5 ms; at 32 the int8 ones win, 110.9 vs 133.5."""
    return 16 if dtype_name == "bfloat16" or dense_int8 else 32


@dataclass(frozen=True, slots=True)
class StepPath:
    small: bool  # the layers' linears read their 4-bit copies
    small_logits: bool  # the lm_head reads its Q8_0 copy
    split_rows: int  # dense linears take at most this many rows per call (0: all at once)
    stack: bool  # every layer in one C++ call (csrc/decode_stack.cpp)


DENSE = StepPath(small=False, small_logits=False, split_rows=0, stack=False)


@dataclass(frozen=True, slots=True)
class PathRule:
    """What a model's weights and this machine allow, fixed at load (engine/factory.py)."""

    small_rows: int = 0  # unseeded decode-only steps of at most this many rows read the 4-bit copies
    small_logits_rows: int = 0  # ... and the Q8_0 lm_head up to this many rows
    stack: bool = False  # decode-only steps may run all layers in one C++ call
    # The dense weights are int8 (engine/int8.py): row-invariant at any row count, and not in the
    # C++ stack (which runs the 4-bit steps only then).
    dense_int8: bool = False

    def choose(self, rows: int, decode_only: bool, seeded: bool) -> StepPath:
        """The path of a step of `rows` rows; `decode_only`: no prompt chunk in it; `seeded`: some
        request in it has a seed."""
        small = decode_only and not seeded
        small_layers = small and rows <= self.small_rows
        return StepPath(
            small=small_layers,
            small_logits=small and rows <= self.small_logits_rows,
            split_rows=EXACT_ROWS if seeded and not self.dense_int8 else 0,
            stack=self.stack and decode_only and (small_layers or not self.dense_int8),
        )

    def describe(self) -> str:
        """One line for the logs and `budrt status`: which weights each kind of step reads."""
        parts = []
        if self.small_rows:
            parts.append(f"decode steps of <= {self.small_rows} rows read the GGUF's 4-bit weights")
        if self.small_logits_rows:
            parts.append(f"their logits of <= {self.small_logits_rows} rows the Q8_0 lm_head")
        dense = "the int8 weights" if self.dense_int8 else "the dense weights"
        parts.append(f"other steps {dense}" if parts else f"every step reads {dense}")
        if self.stack:
            parts.append("decode-only steps run all layers in one C++ call")
        return "; ".join(parts)
