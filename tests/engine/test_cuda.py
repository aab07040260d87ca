"""The engine on a CUDA device: the same greedy tokens as the CPU engine on the same tiny model.

Skipped without a GPU (CI has none); bench/gpu.sh runs these on a lent GPU with `-k cuda`.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import torch

from budrt.engine.factory import create_text_engine
from budrt.engine.interface import SamplingParams
from budrt.engine.llm_engine import LLMEngine
from tests.tiny_models import build_tiny_llama, tiny_config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)

PROMPTS = ["hello world", "the quick brown fox", "abc"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("cuda") / "tiny", seed=0)


def greedy(engine: LLMEngine, max_tokens: int = 16) -> list[list[int]]:
    """Each prompt alone, then all of them batched; the token ids of each."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(rid: str, prompt: str) -> list[int]:
        ids = engine.tokenizer.encode(prompt)
        return [t async for out in engine.generate(rid, ids, params) for t in out.token_ids]

    async def run() -> list[list[int]]:
        await engine.start()
        try:
            alone = [await one(f"alone-{i}", p) for i, p in enumerate(PROMPTS)]
            batched = await asyncio.gather(*(one(f"batch-{i}", p) for i, p in enumerate(PROMPTS)))
            return alone + list(batched)
        finally:
            await engine.stop()

    return asyncio.run(run())


def engine_on(path: Path, device: str, dtype: str) -> LLMEngine:
    engine = create_text_engine(tiny_config("tiny", path).model_copy(update={"dtype": dtype}), device)
    assert isinstance(engine, LLMEngine)
    return engine


def test_cuda_fp32_greedy_equals_cpu(tiny_path: Path) -> None:
    cpu = greedy(engine_on(tiny_path, "cpu", "float32"))
    gpu_engine = engine_on(tiny_path, "cuda", "float32")
    assert gpu_engine.runner.cache.data.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in gpu_engine.runner.model.parameters())
    assert greedy(gpu_engine) == cpu


def test_cuda_auto_dtype_is_half_precision_and_agrees_with_cpu(tiny_path: Path) -> None:
    gpu_engine = engine_on(tiny_path, "cuda", "auto")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert gpu_engine.dtype == expected and gpu_engine.runner.cache.data.dtype == expected
    assert next(gpu_engine.runner.model.parameters()).dtype == expected
    # Half precision may drift from fp32 late in a continuation; the first tokens must agree
    # (on the CPU, bf16 matched fp32 for all 16 tokens of these prompts).
    cpu = greedy(engine_on(tiny_path, "cpu", "float32"), max_tokens=8)
    assert greedy(gpu_engine, max_tokens=8) == cpu


def test_cuda_kv_cache_is_capped_by_free_memory(tiny_path: Path) -> None:
    # Ask for far more KV than the card has: the cache gets what utilization x memory leaves.
    free, total = torch.cuda.mem_get_info()
    cfg = tiny_config("tiny", tiny_path).model_copy(update={"kv_cache_bytes": 4 * total})
    engine = create_text_engine(cfg, "cuda")
    assert isinstance(engine, LLMEngine)
    cache = engine.runner.cache.data
    size = cache.numel() * cache.element_size()
    del engine, cache
    gc.collect()
    torch.cuda.empty_cache()  # give the card back to the tests after this one
    assert 0 < size <= int(total * 0.9) - (total - free)


def build_tiny_bert(directory: Path) -> Path:
    """A random 2-layer BERT directory with a word-level tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *"the quick brown fox jumps over a lazy dog".split()]
    tokenizer = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(directory))
    return directory


def test_cuda_embedding_model_matches_cpu(tmp_path: Path) -> None:
    from budrt.config import ModelConfig
    from budrt.server.embeddings import EmbeddingModel

    cfg = ModelConfig(
        name="bert",
        task="embedding",
        format="sentence-transformers",
        source=str(build_tiny_bert(tmp_path / "bert")),
        max_model_len=64,
    )
    cpu, gpu = EmbeddingModel(cfg, "cpu"), EmbeddingModel(cfg, "cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    batch = cpu.tokenize(["the quick brown fox", "a lazy dog jumps over the fox"])
    expected, got = cpu.embed(batch), gpu.embed(batch)
    assert got.device.type == "cpu"  # the routes serialize from CPU memory
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
