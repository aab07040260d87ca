"""The KV cache's dtype (engine/kv_cache.cache_dtype): fp16 under fp32 activations on a CPU by
default, the activations' own elsewhere, and what the model server's memory estimate counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from budrt.config import ModelConfig
from budrt.engine import kernels
from budrt.engine.factory import create_text_engine
from budrt.engine.interface import SamplingParams
from budrt.engine.kv_cache import cache_dtype
from budrt.engine.llm_engine import LLMEngine
from budrt.engine.sequence import make_sequence
from budrt.server.cost import estimate_cost

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_fp16_under_fp32_on_a_cpu_and_the_activations_dtype_elsewhere() -> None:
    assert cache_dtype("auto", torch.float32, CPU) == torch.float16
    assert cache_dtype("auto", torch.bfloat16, CPU) == torch.bfloat16
    assert cache_dtype("auto", torch.float32, CUDA) == torch.float32
    assert cache_dtype("auto", torch.bfloat16, CUDA) == torch.bfloat16
    assert cache_dtype("float32", torch.float32, CPU) == torch.float32
    assert cache_dtype("bfloat16", torch.float32, CPU) == torch.bfloat16


@pytest.mark.parametrize(
    ("configured", "activations"), [("float32", torch.bfloat16), ("float16", torch.bfloat16)]
)
def test_a_cache_the_kernels_cannot_pair_with_the_activations_is_refused(
    configured: str, activations: torch.dtype
) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        cache_dtype(configured, activations, CPU)


def _smollm2(gguf_path: Path, **overrides: object) -> ModelConfig:
    fields = {"name": "smollm2", "task": "chat", "format": "gguf", "source": str(gguf_path),
              "dtype": "float32", "max_model_len": 256, "max_num_seqs": 4,
              "kv_cache_bytes": 8 * 1024**2}  # fmt: skip
    return ModelConfig(**(fields | overrides))


def _answer(engine: LLMEngine, question: str) -> str:
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))
    out: list[int] = []
    seq = make_sequence("q", ids, SamplingParams(max_tokens=12, temperature=0.0), tok, 256,
                        engine.vocab_size, lambda o: out.extend(o.token_ids))  # fmt: skip
    engine.scheduler.add(seq)
    while engine.scheduler.has_work():
        engine.step()
    return tok.decode(out)


def test_an_fp32_engine_keeps_twice_the_tokens_in_fp16_and_answers(gguf_path: Path) -> None:
    half = create_text_engine(_smollm2(gguf_path))
    full = create_text_engine(_smollm2(gguf_path, kv_cache_dtype="float32"))
    assert isinstance(half, LLMEngine) and isinstance(full, LLMEngine)
    assert half.runner.cache.data.dtype == torch.float16 and half.runtime["kv_cache_dtype"] == "float16"
    assert full.runner.cache.data.dtype == torch.float32
    assert half.runner.cache.num_blocks == 2 * full.runner.cache.num_blocks  # the same byte budget
    assert "Paris" in _answer(half, "What is the capital of France?")


def test_the_torch_path_reads_a_16bit_cache_too(gguf_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C++ kernels (a CPU build with no compiler) the gathered cache is widened for
    torch's attention: the same answer."""
    monkeypatch.setenv(kernels.ENV_SWITCH, "torch")
    engine = create_text_engine(_smollm2(gguf_path, int8_linears=False, q4_decode_rows=0))
    assert isinstance(engine, LLMEngine) and engine.runner.cache.data.dtype == torch.float16
    assert "Paris" in _answer(engine, "What is the capital of France?")


def test_the_memory_estimate_counts_the_cache_dtype(gguf_path: Path) -> None:
    # No configured budget: a slot per sequence at full length, at the cache's element size.
    cfg = _smollm2(gguf_path, kv_cache_bytes=0, max_num_seqs=64, max_model_len=2048)
    half = estimate_cost(cfg, gguf_path)
    full = estimate_cost(cfg.model_copy(update={"kv_cache_dtype": "float32"}), gguf_path)
    # SmolLM2: 30 layers, 3 kv heads of 64; k and v for 64 x 2048 positions, 2 bytes more each.
    assert full - half == pytest.approx(2 * 30 * 3 * 64 * 64 * 2048 * 2 * 1.1, rel=1e-6)
