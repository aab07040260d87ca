"""Build a ready-to-start text engine from a `ModelConfig`."""

from __future__ import annotations

import ctypes
import dataclasses
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
from budrt.engine.kv_cache import KVCache, cache_dtype, num_blocks_for
from budrt.engine.linear import Linear, LinearForms, onednn_packs
from budrt.engine.llama import LlamaArgs, LlamaForCausalLM, Q8Embedding, fuse_weights, linear_weight_names
from budrt.engine.llm_engine import LLMEngine
from budrt.engine.safetensors_loader import load_safetensors, stored_names
from budrt.engine.step_path import SMALL_LOGITS_ROWS, PathRule, default_small_rows
from budrt.engine.tokenizer import TextTokenizer
from budrt.model_source import resolve_source
from budrt.observe.progress import NO_PROGRESS, ProgressReporter

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
    """A model's files as loaded: hyperparameters, weights, GGUF quantized copies, the int8 forms
    of its dense weights (stored by the gguf cache), tokenizer."""

    args: LlamaArgs
    weights: dict[str, torch.Tensor]
    quantized: dict[str, quant.SmallWeight]
    rounded: dict[str, int8.RoundedWeight]
    tokenizer: TextTokenizer


class _Plan(NamedTuple):
    """What is decided before building a model: where, in which dtypes, its weights' forms."""

    target: torch.device
    dtype: torch.dtype  # activations
    kv_dtype: torch.dtype
    max_model_len: int
    dense_int8: bool  # `_int8_linears`
    kernels_ready: bool  # the C++ kernels are loaded (CPU)
    onednn: bool  # the dense weights are packed for oneDNN (linear.onednn_packs)


class _Assembled(NamedTuple):
    """A model ready to serve, with the rule for its steps' paths and its one-call decode layers."""

    model: LlamaForCausalLM
    rule: PathRule
    stack: DecodeStack | None


def create_text_engine(
    cfg: ModelConfig, device: str | torch.device = "cpu", progress: ProgressReporter = NO_PROGRESS
) -> Engine:
    """Load the model and tokenizer named by `cfg` (GGUF or a Hugging Face safetensors directory)
    onto `device` ("cpu", "cuda:N": chosen by the server's placement). `progress` hears of its
    phases: "compile" (the kernels, if not built yet), "dequantize" or "read", then "pack".

    Synchronous and slow (seconds): call it before serving, then `await engine.start()`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if cfg.task != "chat":
        raise ValueError(f"model {cfg.name!r}: task {cfg.task!r} is not text generation")
    path = resolve_source(cfg.source)
    target = torch.device(device)
    dtype, dtype_reason = _model_dtype(cfg, target)
    kv_dtype = cache_dtype(cfg.kv_cache_dtype, dtype, target)  # refuses a pair the kernels cannot read
    # Before loading: the weights' forms decide what is read. The small copies are kept only
    # where their C++ kernels are loaded.
    kernels_ready = target.type == "cpu" and kernels.prepare(progress=progress)
    onednn = onednn_packs(dtype, target, cpu_features.native_bf16()[0])
    checkpoint, dense_int8 = _load_checkpoint(cfg, path, dtype, kernels_ready, progress, onednn)
    args, tokenizer = checkpoint.args, checkpoint.tokenizer
    max_model_len = min(cfg.max_model_len, args.max_position_embeddings)
    plan = _Plan(target, dtype, kv_dtype, max_model_len, dense_int8, kernels_ready, onednn)
    assembled, cache = _build(cfg, checkpoint, plan, progress)
    del checkpoint  # the loaded tensors the model holds in other forms
    _return_freed_memory()
    log.info(
        "loaded %s from %s (%s, max_model_len=%d, %d KV blocks of %d tokens, KV %s); %s",
        cfg.name,
        path,
        dtype,
        max_model_len,
        cache.num_blocks,
        cache.block_size,
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
        cache=cache,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_prefix_caching=cfg.enable_prefix_caching,
        jump_forward=cfg.jump_forward,
        dtype=dtype,
        identity=f"{cfg.name}:{cfg.source}",
        path_rule=assembled.rule,
        decode_stack=assembled.stack,
        runtime=_runtime(dtype, dtype_reason, target)
        | {"kv_cache_dtype": str(kv_dtype).removeprefix("torch."), "weights": assembled.rule.describe()},
    )


def _return_freed_memory() -> None:
    """Hand the buffers freed after the load back to the OS. glibc keeps freed heap memory for
    reuse: SmolLM2's model server held ~0.5 GB more after loading than its model needs (RSS 1,390
    MB before `malloc_trim`, 705 after, int8 weights; 898 after with fp32 ones). The loaded
    tensors are freed by their reference counts: a `gc.collect()` here took 80 ms of each load and
    freed nothing more (the same RSS, bf16 SmolLM2)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator returns memory by its own rules
        return
    libc.malloc_trim(0)


def _load_checkpoint(
    cfg: ModelConfig,
    path: Path,
    dtype: torch.dtype,
    kernels_ready: bool,
    progress: ProgressReporter = NO_PROGRESS,
    repacked: bool = False,
) -> tuple[_Checkpoint, bool]:
    """The weights and tokenizer at `path`, a GGUF file or a safetensors directory; and whether
    the dense weights are int8 (`_int8_linears`). Of a directory only the forms that path reads,
    those the build copies again as views of the mapped file (`_borrowed`); `repacked`: the
    linears' weights are packed into new memory at build (oneDNN)."""
    if cfg.format == "gguf":
        gguf = load_gguf(path, progress)
        tokenizer = TextTokenizer.from_gguf_metadata(gguf.metadata)
        dense_int8 = _int8_linears(cfg, bool(gguf.quantized), dtype, kernels_ready)
        return _Checkpoint(gguf.args, gguf.weights, gguf.quantized, {}, tokenizer), dense_int8
    if cfg.format == "safetensors":
        names = stored_names(path)
        has_small = any(n.endswith(quant.STORED_SUFFIXES) for n in names)
        dense_int8 = _int8_linears(cfg, has_small, dtype, kernels_ready)
        borrow = _borrowed(names, repacked, dense_int8)
        args, weights = load_safetensors(path, _unread(names, dense_int8), progress, dtype, borrow)
        quantized = quant.split(weights)  # present in the gguf cache's directories
        rounded = int8.split(weights)
        checkpoint = _Checkpoint(args, weights, quantized, rounded, TextTokenizer.from_directory(path))
        return checkpoint, dense_int8
    raise ValueError(f"model {cfg.name!r}: format {cfg.format!r} is not a text-generation format")


def _borrowed(names: set[str], repacked: bool, dense_int8: bool) -> set[str]:
    """Stored tensors read as views of the mapped file, not copies: those the build copies into
    memory of its own. With `repacked` (oneDNN) the linears' weights (SmolLM2's read ~0.1 ->
    ~0.01 s); with int8 dense weights their int8 levels (FBGEMM copies them: ~0.04 s of a start)."""
    weights = {n for n in names if n == "lm_head.weight" or n.endswith("_proj.weight")} if repacked else set()
    return weights | ({n for n in names if n.endswith(int8.SUFFIXES[0])} if dense_int8 else set())


def _unread(names: set[str], dense_int8: bool) -> set[str]:
    """Stored tensors the model will not read: with int8 linears, the fp32 weights that have an
    int8 form (the embedding's only when its Q8_0 copy is the table: `build_model`); otherwise
    the int8 forms."""
    rounded = {n.removesuffix(int8.SUFFIXES[0]) for n in names if n.endswith(int8.SUFFIXES[0])}
    if not dense_int8:
        return {base + suffix for base in rounded for suffix in int8.SUFFIXES}
    q8_embedding = "embed_tokens.weight" + quant.Q8_SUFFIXES[0] in names
    return {base for base in rounded if base != "embed_tokens.weight" or q8_embedding}


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


def _build(
    cfg: ModelConfig, checkpoint: _Checkpoint, plan: _Plan, progress: ProgressReporter
) -> tuple[_Assembled, KVCache]:
    """The model, then its KV cache (on CUDA the cache takes the memory the model leaves free)."""
    assembled = _assemble_model(cfg, checkpoint, plan, progress)
    return assembled, _kv_cache(cfg, checkpoint.args, plan)


def _kv_cache(cfg: ModelConfig, args: LlamaArgs, plan: _Plan) -> KVCache:
    """The blocks `cfg.kv_cache_bytes` holds (on CUDA also what free memory allows), zeroed."""
    num_blocks = num_blocks_for(
        cfg.kv_cache_bytes,
        args.num_layers,
        args.num_kv_heads,
        args.head_dim,
        cfg.block_size,
        plan.kv_dtype,
        torch.device("cpu"),
    )
    num_blocks = fit_kv_blocks(num_blocks, args, cfg.block_size, plan.kv_dtype, plan.target)
    return KVCache(
        args.num_layers,
        num_blocks,
        cfg.block_size,
        args.num_kv_heads,
        args.head_dim,
        plan.kv_dtype,
        plan.target,
    )


def _assemble_model(
    cfg: ModelConfig, checkpoint: _Checkpoint, plan: _Plan, progress: ProgressReporter
) -> _Assembled:
    """The model on its device, its linears in the forms this machine's steps read
    (engine/linear.py), the rule choosing among them per step, and on CPU the one-call decode
    layers where they fit."""
    small_rows = cfg.q4_decode_rows
    if small_rows is None:
        small_rows = default_small_rows(str(plan.dtype).removeprefix("torch."), plan.dense_int8)
    forms = LinearForms(
        onednn=plan.onednn,
        int8=plan.dense_int8,
        small=plan.kernels_ready and small_rows > 0,
    )
    model = build_model(checkpoint, plan.dtype, plan.max_model_len, forms, progress)
    to_device(model, plan.target)  # no-op on CPU
    stack = DecodeStack.build(model) if plan.kernels_ready else None
    return _Assembled(model, _path_rule(model, small_rows, stack, forms.int8), stack)


def _int8_linears(cfg: ModelConfig, quantized_file: bool, dtype: torch.dtype, kernels_ready: bool) -> bool:
    """Whether the dense weights are int8 (engine/int8.py): `cfg.int8_linears`, by default for a
    file already quantized to 4 or 8 bits, run in fp32 on a CPU with FBGEMM and our kernels."""
    possible = kernels_ready and dtype == torch.float32 and int8.available()
    if cfg.int8_linears is None:
        return possible and quantized_file
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
    checkpoint: _Checkpoint,
    dtype: torch.dtype,
    max_model_len: int,
    forms: LinearForms = LinearForms(),
    progress: ProgressReporter = NO_PROGRESS,
) -> LlamaForCausalLM:
    """The model with `checkpoint`'s weights in `dtype`: its linears made whole from the weights
    (fused q/k/v and gate/up), the embedding and norms loaded in place. `progress` hears of the
    linears made (phase "pack")."""
    # RoPE tables only need to cover the positions we serve.
    args = dataclasses.replace(checkpoint.args, max_position_embeddings=max_model_len)
    num_linears = 4 * args.num_layers + 1  # per layer qkv, o, gate_up, down; and the lm_head
    progress.report("pack", 0, num_linears)
    weights, quantized = dict(checkpoint.weights), dict(checkpoint.quantized)
    rounded = dict(checkpoint.rounded) if forms.int8 else {}
    fuse_weights(weights, quantized, rounded)
    int8_weights = _int8_weights(weights, rounded, args) if forms.int8 else {}
    params = {name: nn.Parameter(t.to(dtype), requires_grad=False) for name, t in weights.items()}
    linears: set[str] = set()

    def make_linear(name: str) -> Linear:
        linears.add(name)
        tied = name == "lm_head" and args.tie_word_embeddings
        source = f"{'embed_tokens' if tied else name}.weight"
        weight = params.get(source) if tied else params.pop(source, None)
        bias = params.pop(f"{name}.bias", None)
        linear = Linear(weight, bias, forms, quantized.get(source), int8_weights.get(source))
        progress.report("pack", min(len(linears), num_linears), num_linears)
        return linear

    # With int8 linears nothing else reads the fp32 table: the embedding reads the file's Q8_0 one.
    embed_q8 = quantized.get("embed_tokens.weight")
    # So with oneDNN packed ones, once the lm_head has packed its copy of a tied table (bf16
    # SmolLM2: 54 MB less).
    repacked = forms.int8 or forms.onednn
    embedding = Q8Embedding(embed_q8, dtype) if repacked and isinstance(embed_q8, quant.Q8Weight) else None
    model = LlamaForCausalLM(args, make_linear, embedding)
    if embedding is not None:
        params.pop("embed_tokens.weight", None)
    missing, unexpected = model.load_state_dict(params, strict=False, assign=True)
    missing = [m for m in missing if m.rsplit(".", 1)[0] not in linears]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing={missing} unexpected={unexpected}")
    progress.report("pack", num_linears, num_linears)
    return model.eval().requires_grad_(False)


def _int8_weights(
    weights: dict[str, torch.Tensor], rounded: dict[str, int8.RoundedWeight], args: LlamaArgs
) -> dict[str, int8.Int8Weight]:
    """Every linear's int8 weight by weight name: its stored rounded form (the gguf cache's), else
    its fp32 weight rounded now; packed all at once, on torch's threads."""
    names = linear_weight_names({*weights, *rounded}, args)
    forms = [rounded[n] if n in rounded else int8.round_weight(weights[n]) for n in names]
    return dict(zip(names, int8.pack(forms, torch.get_num_threads()), strict=True))
