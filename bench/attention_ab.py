"""Paged decode attention, this tree's kernel against an earlier revision's, in one process.

`python bench/attention_ab.py --base HEAD~1 --cases 64x290 64x150 16x290 1x400`

Builds the decode-attention sources (`csrc/attention_loops.cpp`, where the revision has it, then
`csrc/paged_attention.cpp`) as they are at `--base` and in the working tree (two extensions, the
flags of engine/kernel_build.py at this machine's level), fills 30 layers of SmolLM2-shaped bf16
caches (9 query heads, 3 kv heads, head_dim 64, blocks of 16) whose blocks are shuffled through memory, and
times a step's worth of attention (every layer once) with each kernel, alternately, `--rounds`
times. `BxL` is B sequences of random lengths in [L/2, L]. Checks that both give the same output.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.cpp_extension import load_inline

from budrt.engine import cpu_features, kernel_build

SOURCES = ["src/budrt/engine/csrc/attention_loops.cpp", "src/budrt/engine/csrc/paged_attention.cpp"]
ROOT = Path(__file__).resolve().parent.parent


def revision_text(revision: str, path: str) -> str:
    """`path` as it is at `revision`; empty if the file did not exist there."""
    shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else ""


def build(name: str, source: str, folder: Path) -> ModuleType:
    kernel_build.ensure_ninja_on_path()
    level, why = cpu_features.kernel_level()
    assert level is not None, why
    folder.mkdir(parents=True, exist_ok=True)
    return load_inline(
        name=name,
        cpp_sources=[source],
        functions=["paged_decode_attention"],
        extra_cflags=kernel_build.compile_flags(level),
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
    )


def case(
    batch: int, length: int, layers: int = 30
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    heads, kv_heads, dim, block = 9, 3, 64, 16
    per_seq = (length + block - 1) // block
    num_blocks = batch * per_seq + 1
    caches = [
        (
            torch.randn(num_blocks, block, kv_heads, dim).bfloat16(),
            torch.randn(num_blocks, block, kv_heads, dim).bfloat16(),
        )
        for _ in range(layers)
    ]
    tables = torch.randperm(num_blocks)[: batch * per_seq].view(batch, per_seq).to(torch.int32)
    lengths = torch.randint(max(length // 2, 1), length + 1, (batch,), dtype=torch.int32)
    return torch.randn(batch, heads, dim).bfloat16(), caches, tables, lengths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="HEAD~1", help="git revision to compare against")
    ap.add_argument("--cases", nargs="+", default=["64x290", "64x150", "16x290", "1x400"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base_source = "\n".join(revision_text(args.base, path) for path in SOURCES)
    new_source = "\n".join((ROOT / path).read_text() for path in SOURCES)
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {
            "base": build("attention_ab_base", base_source, Path(tmp) / "base"),
            "new": build("attention_ab_new", new_source, Path(tmp) / "new"),
        }
        for spec in args.cases:
            batch, length = (int(x) for x in spec.split("x"))
            q, caches, tables, lengths = case(batch, length)
            scale = q.shape[-1] ** -0.5
            outputs = [
                k.paged_decode_attention(q, *caches[0], tables, lengths, scale) for k in kernels.values()
            ]
            same = torch.equal(outputs[0], outputs[1])
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(args.rounds):
                for name, kernel in kernels.items():
                    start = time.perf_counter()
                    for keys, values in caches:
                        kernel.paged_decode_attention(q, keys, values, tables, lengths, scale)
                    times[name].append((time.perf_counter() - start) * 1e3)
            base, new = (statistics.median(times[name]) for name in ("base", "new"))
            print(
                f"{spec:>7}: base {base:6.2f} ms  new {new:6.2f} ms  new/base {new / base:.2f}"
                f"  (30 layers, median of {args.rounds}, {args.threads} threads, same output: {same})",
                flush=True,
            )


if __name__ == "__main__":
    main()
