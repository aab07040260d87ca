"""The tiny variants as llama.cpp would convert them to GGUF, loaded by our GGUF path, vs transformers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from hf_variants import (  # noqa: E402
    KV_BYTES,
    PROMPTS,
    VARIANTS,
    alone_then_batched,
    assert_same,
    build,
    hf_greedy,
    write_gguf,
)

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine.factory import create_text_engine  # noqa: E402
from budrt.engine.rope import rope_inv_freq  # noqa: E402


def test_gguf_rope_freqs_equal_llama3_scaling() -> None:
    """A Llama 3.1+ GGUF stores its RoPE scaling as per-frequency divisors (`rope_freqs`); divided
    out, they give exactly transformers' llama3 frequencies."""
    llama3 = dict(VARIANTS["llama3-rope-scaling"][1]["rope_scaling"])
    theta = llama3.pop("rope_theta")
    plain, scaled = rope_inv_freq(16, theta), rope_inv_freq(16, theta, llama3)
    factors = (plain / scaled).tolist()
    assert any(f == 1.0 for f in factors) and any(f == llama3["factor"] for f in factors)
    from_gguf = rope_inv_freq(16, theta, {"rope_type": "freq_factors", "factors": factors})
    assert torch.allclose(from_gguf, scaled, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("variant", "arch"), [("llama3-rope-scaling", "llama"), ("qwen3-qk-norm", "qwen3")])
def test_gguf_variant_matches_transformers(
    variant: str, arch: str, tokenizer_files: Path, tmp_path: Path
) -> None:
    """The same checkpoints as llama.cpp would convert them: Q/K rows permuted (llama arch), Llama 3
    scaling as a `rope_freqs` tensor, Qwen3's q/k norms; tokenizer from the GGUF metadata."""
    _, hf_model = build(variant, tmp_path, tokenizer_files)
    path = tmp_path / f"{variant}.gguf"
    write_gguf(hf_model, arch, tokenizer_files, path)
    cfg = ModelConfig(
        name=variant,
        task="chat",
        format="gguf",
        source=str(path),
        dtype="float32",
        kv_cache_dtype="float32",  # compared with transformers' fp32 exactly
        max_model_len=256,
        kv_cache_bytes=KV_BYTES,
    )
    engine = create_text_engine(cfg)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    expected = hf_greedy(hf_model, prompts)
    alone, batched = asyncio.run(alone_then_batched(engine, prompts))
    assert_same(alone, expected)
    assert_same(batched, expected)
