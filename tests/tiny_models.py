"""Tiny random Llama checkpoints (load in well under a second) and a model-server process to host them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from budrt.config import ModelConfig, Settings, runtime_dump
from budrt.security import certs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_llama(
    directory: Path, seed: int = 0, hidden: int = 64, vocab: int = 256, positions: int = 512
) -> Path:
    """A safetensors Llama directory with a byte-level BPE tokenizer, seeded random weights."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab_map = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab_map, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(directory / "tokenizer.json"))
    size = max(vocab, len(vocab_map))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
        )
    )
    # Written directly (no transformers import: that alone takes seconds).
    heads, kv_heads, inter, layers = 4, 2, hidden * 2, 2
    head_dim = hidden // heads
    config = {
        "model_type": "llama",
        "vocab_size": size,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    (directory / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    weights = {"model.embed_tokens.weight": rand(size, hidden), "lm_head.weight": rand(size, hidden)}
    weights["model.norm.weight"] = torch.ones(hidden)
    for i in range(layers):
        pre = f"model.layers.{i}."
        weights[pre + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        weights[pre + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden)
        weights[pre + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        weights[pre + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        weights[pre + "mlp.gate_proj.weight"] = rand(inter, hidden)
        weights[pre + "mlp.up_proj.weight"] = rand(inter, hidden)
        weights[pre + "mlp.down_proj.weight"] = rand(hidden, inter)
        weights[pre + "input_layernorm.weight"] = torch.ones(hidden)
        weights[pre + "post_attention_layernorm.weight"] = torch.ones(hidden)
    save_file(weights, str(directory / "model.safetensors"))
    return directory


def tiny_config(name: str, path: Path, **extra: object) -> ModelConfig:
    fields: dict[str, object] = {
        "name": name,
        "task": "chat",
        "format": "safetensors",
        "source": str(path),
        "dtype": "float32",
        "max_model_len": 512,
        "max_num_seqs": 4,
        "kv_cache_bytes": 8 << 20,
        "preload": False,
    }
    return ModelConfig(**(fields | extra))  # type: ignore[arg-type]


def start_server(
    home: Path,
    models: list[ModelConfig],
    internal_key: str | None = None,
    tls: dict[str, object] | None = None,
    **server: object,
) -> tuple[subprocess.Popen, str]:
    """A model server process on a free port; `internal_key`: the credential it then requires;
    `tls`: the settings' `tls` section (enabled: HTTPS, clients need the platform's certificate)."""
    port = int(server.pop("port", 0)) or _free_port()  # a restart takes its old port again
    settings = Settings(
        home=home,
        models=models,
        model_servers=[{"name": "s", "models": [m.name for m in models], "port": port, **server}],
        internal_key=internal_key,
        tls=tls or {},
    )
    paths = certs.platform_paths(settings.tls, home)  # made here first: the test may need them
    verify = certs.client_context(paths, with_client_cert=True) if paths is not None else True
    auth = {"Authorization": f"Bearer {internal_key}"} if internal_key else {}
    runtime = home / "runtime.json"
    runtime.write_bytes(runtime_dump(settings, servers=True))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "budrt.server", "--runtime", str(runtime), "--name", "s"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=(home / "server.log").open("wb"))
    host = str(server.get("host", "127.0.0.1"))
    url = f"{'https' if paths is not None else 'http'}://{host}:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, (home / "server.log").read_text()
        try:
            if httpx.get(f"{url}/health/ready", headers=auth, timeout=2, verify=verify).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("model server not ready in 60 s")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
