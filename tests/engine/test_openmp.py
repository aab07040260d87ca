"""engine/openmp.py: torch work done in another thread must not leave the engine's OpenMP workers
sleeping between parallel ops (they did: ~250 context switches per decode step)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from budrt.engine import openmp

# Run in a fresh process: pools left by other tests in this one would change the count.
PROBE = textwrap.dedent(
    """
    import resource, sys, threading, torch
    from budrt.engine import openmp

    def torch_work():
        a = torch.ones(1 << 21)
        for _ in range(20):
            a = a + 1  # parallel: this thread gets its own OpenMP pool

    work = openmp.released(torch_work) if sys.argv[1] == "released" else torch_work
    done = threading.Event()
    def loader():  # like an executor thread that loaded a model and stays alive
        work()
        done.set()
        threading.Event().wait(30)
    threading.Thread(target=loader, daemon=True).start()
    done.wait()
    x = torch.ones(1 << 17)
    for _ in range(20):
        x = x + 1
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    for _ in range(400):
        x = x + 1
    after = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    print(after - before)
    """
)


def switches_per_op(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return int(out.stdout.strip()) / 400


def test_release_reports_the_runtime() -> None:
    uses_openmp = "OpenMP" in torch.__config__.parallel_info()
    assert openmp.release_thread_pool() is uses_openmp
    assert torch.ones(1 << 20).add(1).sum().item() == 2 * (1 << 20)  # the next parallel op works


@pytest.mark.skipif(
    (os.cpu_count() or 1) < 2 or "OpenMP" not in torch.__config__.parallel_info(),
    reason="needs 2+ CPUs and torch on OpenMP",
)
def test_released_pool_keeps_workers_spinning() -> None:
    released = switches_per_op("released")
    kept = switches_per_op("kept")
    print(f"voluntary context switches per parallel op: released {released:.2f}, kept {kept:.2f}")
    # Spinning workers: the thread running parallel ops almost never sleeps.
    assert released < 0.2
