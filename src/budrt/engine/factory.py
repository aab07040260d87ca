"""Build a ready-to-start text engine from a `ModelConfig`."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from budrt.config import ModelConfig
from budrt.engine import cpu_features, int8, kernels, quant
from budrt.engine.decode_stack import DecodeStack
from budrt.engine.device import cuda_dtype, fit_kv_blocks, to_device
from budrt.engine.gguf_loader import load_gguf
from budrt.engine.interface import Engine
from budrt.engine.kv_cache import cache_dtype, num_blocks_for
from budrt.engine.linear import Linear, LinearForms, onednn_packs
from budrt.engine.llama import LlamaArgs, LlamaForCausalLM, Q8Embedding, fuse_weights
from budrt.engine.llm_engine import LLMEngine
from budrt.engine.safetensors_loader import load_safetensors
from budrt.engine.step_path import SMALL_LOGITS_ROWS, PathRule, default_small_rows
from budrt.engine.tokenizer import TextTokenizer
from budrt.model_source import resolve_source

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_dtype() -> torch.dtype:
    """bfloat16 where the CPU has bf16 dot products and runs the avx512 kernels, else float32
    (`cpu_features.native_bf16` decides, and says why).

    Measured with SmolLM2-135M decode on the 2-core Xeon dev box (AMX, torch 2.13), ms per step:
    batch 1: fp32 27, bf16 34 (no better: one token per step is bound by overheads); batch 8:
    fp32 51, bf16 40; batch 16 bf16 44. Under load (other processes on the cores) bf16 was
    1.6-2x faster at batch 8 and even at batch 1. bf16 still answers correctly (greedy chat
    answers match fp32's on our checks); without native bf16 the kernels are emulated and slower.
    """
    native, _ = cpu_features.native_bf16()
    return torch.bfloat16 if native else torch.float32


class _Checkpoint(NamedTuple):
    """A model's files as loaded: hyperparameters, weights, GGUF quantized copies, tokenizer."""

    args: LlamaArgs
    weights: dict[str, torch.Tensor]
    quantized: dict[str, quant.SmallWeight]
    tokenizer: TextTokenizer


class _Assembled(NamedTuple):
    """A model ready to serve, with the rule for its steps' paths and its one-call decode layers."""

    model: LlamaForCausalLM
    rule: PathRule
    stack: DecodeStack | None


def create_text_engine(cfg: ModelConfig, device: str | torch.device = "cpu") -> Engine:
    """Load the model and tokenizer named by `cfg` (GGUF or a Hugging Face safetensors directory)
    onto `device` ("cpu", "cuda:N": chosen by the server's placement).

    Synchronous and slow (seconds): call it before serving, then `await engine.start()`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.task != "chat":
        raise ValueError(f"model {cfg.name!r}: task {cfg.task!r} is not text generation")
    path = resolve_source(cfg.source)
    checkpoint = _load_checkpoint(cfg, path)
    args, tokenizer = checkpoint.args, checkpoint.tokenizer
    target = torch.device(device)
    dtype, dtype_reason = _model_dtype(cfg, target)
    kv_dtype = cache_dtype(cfg.kv_cache_dtype, dtype, target)
    max_model_len = min(cfg.max_model_len, args.max_position_embeddings)
    assembled = _assemble_model(cfg, checkpoint, dtype, max_model_len, target)
    del checkpoint  # the loaded tensors the model holds in other forms
    _return_freed_memory()
    num_blocks = _num_kv_blocks(cfg, args, kv_dtype, target)
    log.info(
        "loaded %s from %s (%s, max_model_len=%d, %d KV blocks of %d tokens, KV %s); %s",
        cfg.name,
        path,
        dtype,
        max_model_len,
        num_blocks,
        cfg.block_size,
        str(kv_dtype).removeprefix("torch."),
        assembled.rule.describe(),
    )
    return LLMEngine(
        cfg.name,
        assembled.model,
        tokenizer,
        max_model_len=max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_waiting=cfg.max_waiting,
        num_blocks=num_blocks,
        block_size=cfg.block_size,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_prefix_caching=cfg.enable_prefix_caching,
        dtype=dtype,
        kv_cache_dtype=kv_dtype,
        device=target,
        identity=f"{cfg.name}:{cfg.source}",
        path_rule=assembled.rule,
        decode_stack=assembled.stack,
        runtime=_runtime(dtype, dtype_reason, target)
        | {"kv_cache_dtype": str(kv_dtype).removeprefix("torch."), "weights": assembled.rule.describe()},
    )


def _return_freed_memory() -> None:
    """Hand the buffers freed after the load back to the OS. glibc keeps freed heap memory for
    reuse: SmolLM2's model server held ~0.5 GB more after loading than its model needs (RSS 1,390
    MB before `malloc_trim`, 705 after, int8 weights; 898 after with fp32 ones)."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator returns memory by its own rules
        return
    libc.malloc_trim(0)


def _load_checkpoint(cfg: ModelConfig, path: Path) -> _Checkpoint:
    """The weights and tokenizer at `path`, a GGUF file or a safetensors directory."""
    if cfg.format == "gguf":
        gguf = load_gguf(path)
        tokenizer = TextTokenizer.from_gguf_metadata(gguf.metadata)
        return _Checkpoint(gguf.args, gguf.weights, gguf.quantized, tokenizer)
    if cfg.format == "safetensors":
        args, weights = load_safetensors(path)
        quantized = quant.split(weights)  # present in the gguf cache's directories
        return _Checkpoint(args, weights, quantized, TextTokenizer.from_directory(path))
    raise ValueError(f"model {cfg.name!r}: format {cfg.format!r} is not a text-generation format")


def _model_dtype(cfg: ModelConfig, target: torch.device) -> tuple[torch.dtype, str]:
    """`cfg.dtype`, or for "auto" the best the device computes natively; and why."""
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype], f"configured: dtype {cfg.dtype}"
    if target.type == "cuda":
        return cuda_dtype(target), "auto: what the CUDA device computes natively"
    return auto_dtype(), f"auto: {cpu_features.native_bf16()[1]}"


def _runtime(dtype: torch.dtype, dtype_reason: str, target: torch.device) -> dict[str, Any]:
    """How the model runs, for its load log line and `budrt status`: dtype, CPU kernels, and why."""
    if target.type == "cpu":
        kernels.prepare()  # as the runner will (a no-op after the first): report what it uses
    dtype_name = str(dtype).removeprefix("torch.")
    return {"device": str(target), "dtype": dtype_name, "dtype_reason": dtype_reason, **kernels.describe()}


def _num_kv_blocks(cfg: ModelConfig, args: LlamaArgs, dtype: torch.dtype, target: torch.device) -> int:
    """The KV cache blocks `cfg.kv_cache_bytes` holds; on CUDA also what free memory allows."""
    num_blocks = num_blocks_for(
        cfg.kv_cache_bytes,
        args.num_layers,
        args.num_kv_heads,
        args.head_dim,
        cfg.block_size,
        dtype,
        torch.device("cpu"),
    )
    return fit_kv_blocks(num_blocks, args, cfg.block_size, dtype, target)


def _assemble_model(
    cfg: ModelConfig, checkpoint: _Checkpoint, dtype: torch.dtype, max_model_len: int, target: torch.device
) -> _Assembled:
    """The model on `target`, its linears in the forms this machine's steps read (engine/linear.py),
    the rule choosing among them per step, and on CPU the one-call decode layers where they fit."""
    # Before building: the small copies are kept only where their C++ kernels are loaded.
    kernels_ready = target.type == "cpu" and kernels.prepare()
    dense_int8 = _int8_linears(cfg, checkpoint, dtype, kernels_ready)
    small_rows = cfg.q4_decode_rows
    if small_rows is None:
        small_rows = default_small_rows(str(dtype).removeprefix("torch."), dense_int8)
    forms = LinearForms(
        onednn=onednn_packs(dtype, target, cpu_features.native_bf16()[0]),
        int8=dense_int8,
        small=kernels_ready and small_rows > 0,
    )
    model = build_model(checkpoint, dtype, max_model_len, forms)
    to_device(model, target)  # no-op on CPU
    stack = DecodeStack.build(model) if kernels_ready else None
    return _Assembled(model, _path_rule(model, small_rows, stack, forms.int8), stack)


def _int8_linears(cfg: ModelConfig, checkpoint: _Checkpoint, dtype: torch.dtype, kernels_ready: bool) -> bool:
    """Whether the dense weights are int8 (engine/int8.py): `cfg.int8_linears`, by default for a
    file already quantized to 4 or 8 bits, run in fp32 on a CPU with FBGEMM and our kernels."""
    possible = kernels_ready and dtype == torch.float32 and int8.available()
    if cfg.int8_linears is None:
        return possible and bool(checkpoint.quantized)
    if cfg.int8_linears and not possible:
        raise ValueError(f"model {cfg.name!r}: int8_linears needs fp32, FBGEMM and the C++ kernels")
    return cfg.int8_linears


def _path_rule(
    model: LlamaForCausalLM, small_rows: int, stack: DecodeStack | None, dense_int8: bool
) -> PathRule:
    """Which steps may read the small copies the model's linears hold (see step_path.py)."""
    layer_linears = [m for m in model.layers.modules() if isinstance(m, Linear)]
    has_small = any(linear.has_small for linear in layer_linears)
    return PathRule(
        small_rows=small_rows if has_small else 0,
        small_logits_rows=min(small_rows, SMALL_LOGITS_ROWS) if model.lm_head.has_small else 0,
        stack=stack is not None,
        dense_int8=dense_int8,
    )


def build_model(
    checkpoint: _Checkpoint, dtype: torch.dtype, max_model_len: int, forms: LinearForms = LinearForms()
) -> LlamaForCausalLM:
    """The model with `checkpoint`'s weights in `dtype`: its linears made whole from the weights
    (fused q/k/v and gate/up), the embedding and norms loaded in place."""
    # RoPE tables only need to cover the positions we serve.
    args = dataclasses.replace(checkpoint.args, max_position_embeddings=max_model_len)
    weights, quantized = dict(checkpoint.weights), dict(checkpoint.quantized)
    fuse_weights(weights, quantized)
    params = {name: nn.Parameter(t.to(dtype), requires_grad=False) for name, t in weights.items()}
    linears: set[str] = set()

    def make_linear(name: str) -> Linear:
        linears.add(name)
        tied = name == "lm_head" and args.tie_word_embeddings
        source = "embed_tokens" if tied else name
        weight = params[f"{source}.weight"] if tied else params.pop(f"{name}.weight")
        bias = params.pop(f"{name}.bias", None)
        return Linear(weight, bias, forms, quantized.get(f"{source}.weight"))

    # With int8 linears nothing else reads the fp32 table: the embedding reads the file's Q8_0 one.
    embed_q8 = quantized.get("embed_tokens.weight")
    embedding = Q8Embedding(embed_q8) if forms.int8 and isinstance(embed_q8, quant.Q8Weight) else None
    model = LlamaForCausalLM(args, make_linear, embedding)
    if embedding is not None:
        del params["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(params, strict=False, assign=True)
    missing = [m for m in missing if m.rsplit(".", 1)[0] not in linears]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing={missing} unexpected={unexpected}")
    return model.eval().requires_grad_(False)
