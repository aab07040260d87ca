"""On a CPU above the avx2 kernel level, the engine's path tests run again with `BUDRT_CPU_ISA=avx2`
(avx2 kernels, fp32 activations: the path most CPUs take), so CI on an AVX-512 machine also tests
the AVX2 kernels. On an AVX2 machine those tests already ran at that level: skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from budrt.engine import cpu_features

# The tests that pin every path's tokens: the one-call stack against the Python layers, seeded
# requests against any batch, the 4-bit and Q8_0 kernels, greedy against transformers.
PATH_TESTS = [
    "tests/engine/test_decode_stack.py",
    "tests/engine/test_seed.py",
    "tests/engine/test_linear.py",
    "tests/engine/test_quant.py",
    "tests/engine/test_decode_layers_fp32.py",
    "tests/engine/test_engine.py::test_greedy_matches_transformers_alone_and_batched",
    "tests/engine/test_engine.py::test_seeded_sampling_is_reproducible_across_batch_mixes",
]


def test_path_tests_pass_at_the_avx2_level() -> None:
    level, _ = cpu_features.kernel_level()
    if level in (None, "avx2"):
        pytest.skip(f"this process already runs at the {level} level: the path tests ran there")
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"BUDRT_CPU_ISA": "avx2"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PATH_TESTS],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
