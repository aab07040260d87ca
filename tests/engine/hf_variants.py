"""Tiny random Llama-family checkpoints for the variant tests, and transformers' greedy reference.

Each model is a seeded random init of a transformers config, saved with `save_pretrained` next to a
small byte-level BPE tokenizer.json (or written as llama.cpp would convert it to GGUF), so that
`create_text_engine` loads it exactly like a downloaded model.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from budrt.engine.interface import SamplingParams
from budrt.engine.rope import rope_inv_freq

VOCAB = 320
NEW_TOKENS = 12
KV_BYTES = 8 << 20  # plenty for these prompts; the default budget is sized for real models
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "1 2 3 4 5 6 7 8 9 10, and then some more numbers: 11 12 13",
    "a",
    "Paged attention keeps the key/value cache in fixed-size blocks.",
]
CORPUS = PROMPTS + ["the cat sat on the mat", "numbers 0123456789", "Hello there, how are you today?"] * 4
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.05,
)

# name -> (config class name, overrides of SMALL)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama-mha-untied-theta": (
        "LlamaConfig",
        dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=500.0),
    ),
    "llama3-rope-scaling": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-linear-rope": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            rope_scaling={"rope_type": "linear", "factor": 4.0, "rope_theta": 20000.0},
        ),
    ),
    "qwen2-bias": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2-yarn": (
        "Qwen2Config",
        dict(
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen3-qk-norm": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, tie_word_embeddings=False, rope_theta=1e6)),
}


def write_tokenizer(directory: Path) -> Path:
    """A byte-level BPE (GPT-2 style) trained on a few sentences; no special tokens in the prompts."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    config = {"eos_token": "<|endoftext|>", "bos_token": None, "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def randomize_norms_and_biases(model: torch.nn.Module) -> None:
    # transformers initializes norms to 1 and biases to 0: a loader that dropped them would still pass.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))


def build(name: str, root: Path, tokenizer_dir: Path) -> tuple[Path, Any]:
    cls_name, overrides = VARIANTS[name]
    config = getattr(transformers, cls_name)(**{**SMALL, **overrides})
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_norms_and_biases(model)
    directory = root / name
    model.save_pretrained(directory, safe_serialization=True)
    for file in tokenizer_dir.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory, model


Greedy = tuple[list[int], list[list[float]]]  # tokens, top-TOP log-probabilities at each step
TOP = 5


def hf_greedy(model: Any, prompts: list[list[int]]) -> list[Greedy]:
    """transformers' greedy continuations of all prompts, in one left-padded `generate` call."""
    width = max(len(ids) for ids in prompts)
    inputs = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(inputs)
    for row, ids in enumerate(prompts):
        inputs[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    with torch.inference_mode():
        out = model.generate(
            inputs,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    results = []
    for row in range(len(prompts)):
        top = [torch.log_softmax(step[row].float(), -1).topk(TOP).values.tolist() for step in out.logits]
        results.append((out.sequences[row, width:].tolist(), top))
    return results


async def engine_greedy_batch(engine: Any, prompts: list[list[int]]) -> list[Greedy]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=TOP)

    async def one(i: int, ids: list[int]) -> Greedy:
        outputs = [out async for out in engine.generate(f"r{i}", ids, params)]
        tokens = [t for out in outputs for t in out.token_ids]
        top = [[lp for _, _, lp in step.top] for out in outputs for step in out.logprobs or []]
        return tokens, top

    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts))))


def assert_same(ours: list[Greedy], expected: list[Greedy]) -> None:
    for (tokens, top), (ref_tokens, ref_top) in zip(ours, expected, strict=True):
        assert tokens == ref_tokens
        # The whole distribution's head, not just its argmax: a random tiny model often repeats one
        # token, so equal greedy tokens alone would let wrong attention math through.
        assert torch.allclose(torch.tensor(top), torch.tensor(ref_top), atol=2e-4), (top, ref_top)


async def alone_then_batched(engine: Any, prompts: list[list[int]]) -> tuple[list[Greedy], list[Greedy]]:
    await engine.start()
    try:
        alone = [(await engine_greedy_batch(engine, [ids]))[0] for ids in prompts]
        batched = await engine_greedy_batch(engine, prompts)
    finally:
        await engine.stop()
    return alone, batched


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # convert_hf_to_gguf.py's LlamaModel.permute: rotate_half rows -> interleaved pairs.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_model: Any, arch: str, tokenizer_dir: Path, path: Path) -> None:
    """What llama.cpp's converter writes for this model: fp32 tensors, Llama 3 scaling as rope_freqs."""
    import gguf

    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    if cfg.rope_parameters.get("rope_type") == "llama3":
        params = dict(cfg.rope_parameters)
        theta = params.pop("rope_theta")
        factors = rope_inv_freq(cfg.head_dim, theta) / rope_inv_freq(cfg.head_dim, theta, params)
        writer.add_tensor("rope_freqs.weight", factors.numpy())
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        value = tensor.float()
        if arch == "llama" and name.endswith("q_proj.weight"):
            value = _llama_cpp_permute(value, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            value = _llama_cpp_permute(value, cfg.num_key_value_heads)
        globals_ = {
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
        }
        if name in globals_ or name == "lm_head.weight":
            gguf_name = globals_.get(name, "output.weight")
        else:
            layer, module = name.removeprefix("model.layers.").split(".", 1)
            module, suffix = module.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"
        writer.add_tensor(gguf_name, value.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
