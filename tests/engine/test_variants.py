"""Llama-family variants: tiny random checkpoints (hf_variants.py), our engine vs transformers, fp32.

GQA, tied/untied embeddings, Qwen2 q/k/v biases, Qwen3 QK-norm, Llama 3, linear and YaRN RoPE
scaling and different rope_theta, from a Hugging Face safetensors directory; greedy tokens and the top-5
log-probabilities of every step must match transformers' `generate`, each prompt alone and all
batched together.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from hf_variants import (  # noqa: E402
    KV_BYTES,
    PROMPTS,
    VARIANTS,
    VOCAB,
    alone_then_batched,
    assert_same,
    build,
    hf_greedy,
)

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine.factory import create_text_engine  # noqa: E402
from budrt.engine.safetensors_loader import load_safetensors  # noqa: E402


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_greedy_matches_transformers(variant: str, tokenizer_files: Path, tmp_path: Path) -> None:
    directory, hf_model = build(variant, tmp_path, tokenizer_files)
    cfg = ModelConfig(
        name=variant,
        task="chat",
        format="safetensors",
        source=str(directory),
        dtype="float32",
        kv_cache_dtype="float32",  # compared with transformers' fp32 exactly
        max_model_len=256,
        max_num_seqs=8,
        kv_cache_bytes=KV_BYTES,
    )
    engine = create_text_engine(cfg)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert all(max(ids) < VOCAB for ids in prompts)
    expected = hf_greedy(hf_model, prompts)

    alone, batched = asyncio.run(alone_then_batched(engine, prompts))
    assert_same(alone, expected)
    assert_same(batched, expected)


def test_config_parsing_both_rope_styles(tokenizer_files: Path, tmp_path: Path) -> None:
    """Old-style `rope_theta` + `rope_scaling` (Llama 3.1/3.2 checkpoints) and transformers 5's
    `rope_parameters` read the same; `sliding_window` caps Mistral's servable context."""
    directory, _ = build("llama3-rope-scaling", tmp_path, tokenizer_files)
    new_style, _ = load_safetensors(directory)
    config = json.loads((directory / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = params
    (directory / "config.json").write_text(json.dumps(config))
    old_style, _ = load_safetensors(directory)
    assert old_style == new_style
    assert new_style.rope_theta == 500000.0 and new_style.rope_scaling["rope_type"] == "llama3"

    mistral_dir = build("mistral", tmp_path, tokenizer_files)[0]
    assert load_safetensors(mistral_dir)[0].max_position_embeddings == 256  # window 4096: no cap
    config = json.loads((mistral_dir / "config.json").read_text())
    (mistral_dir / "config.json").write_text(json.dumps(config | {"sliding_window": 128}))
    assert load_safetensors(mistral_dir)[0].max_position_embeddings == 128


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "dynamic"),
        (lambda c: c.update(model_type="gemma"), "gemma"),
    ],
)
def test_unsupported_configs_fail_clearly(
    edit: Callable[[dict], None], message: str, tokenizer_files: Path, tmp_path: Path
) -> None:
    directory, _ = build("llama-gqa-tied", tmp_path, tokenizer_files)
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_safetensors(directory)
