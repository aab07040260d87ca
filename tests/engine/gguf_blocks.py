"""Random weights quantized as a GGUF file stores them (Q4_1, Q8_0), read back by engine/quant.py."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from budrt.engine import quant


def random_q4(out: int, inp: int, seed: int, scale: float = 1.0) -> quant.Q4Weight:
    rng = np.random.default_rng(seed)
    raw = quantize(scale * rng.standard_normal((out, inp)).astype(np.float32), GGMLQuantizationType.Q4_1)
    q4 = quant.from_gguf(raw, GGMLQuantizationType.Q4_1, (out, inp))
    assert q4 is not None
    return q4


def random_q8(out: int, inp: int, seed: int) -> quant.Q8Weight:
    rng = np.random.default_rng(seed)
    raw = quantize(rng.standard_normal((out, inp)).astype(np.float32), GGMLQuantizationType.Q8_0)
    q8 = quant.q8_from_gguf(raw, GGMLQuantizationType.Q8_0, (out, inp))
    assert q8 is not None
    return q8
