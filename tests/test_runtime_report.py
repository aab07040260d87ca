"""A real model server says how each text model runs, in its readiness answer (what `budrt status
--json` shows per model, tests/e2e/test_supervisor.py) and its log: the dtype and the CPU kernel
level, each with why. `BUDRT_CPU_ISA=avx2` runs the AVX2 kernels and fp32 activations, on any CPU
that has AVX2 (on an AVX-512 machine: the lower level, as CI runs it)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from budrt.engine import cpu_features
from tests.procs import stop
from tests.tiny_models import build_tiny_llama, start_server, tiny_config

MODEL = "tiny-runtime"


@pytest.mark.skipif(cpu_features.detect().best_level() is None, reason="this CPU has no AVX2 + FMA + F16C")
def test_forced_avx2_level_and_auto_dtype_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_features.ENV_ISA, "avx2")
    monkeypatch.delenv("BUDRT_ENGINE_KERNELS", raising=False)
    model = tiny_config(MODEL, build_tiny_llama(tmp_path / "tiny")).model_copy(
        update={"dtype": "auto", "preload": True}
    )
    proc, url = start_server(tmp_path, [model], self_test_interval_s=0)
    try:
        body = httpx.get(f"{url}/health/ready", timeout=10).json()
    finally:
        stop(proc)
    [resident] = body["resident"]
    runtime = resident["runtime"]
    best = cpu_features.detect().best_level()
    assert runtime["kernel_level"] == "avx2"
    assert runtime["kernel_level_reason"] == f"forced by BUDRT_CPU_ISA=avx2 (the CPU runs {best})"
    assert runtime["kernels_loaded"] is True and runtime["kernels"] == "loaded"
    assert runtime["dtype"] == "float32"  # the avx2 level means fp32 activations, whatever the CPU
    assert runtime["dtype_reason"].startswith("auto: fp32: ")
    assert runtime["device"] == "cpu"
    assert runtime["cpu"] == cpu_features.detect().model
    assert set(runtime["cpu_flags"]) >= {"avx2", "fma", "f16c"}
    log = (tmp_path / "server.log").read_text()
    assert log.count(f"model {MODEL} runs on ") == 1, log


def test_a_level_above_the_cpu_is_refused_with_what_it_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model server does not start: its log names the flags the CPU lacks and those it has."""
    if cpu_features.detect().best_level() == "avx512":
        pytest.skip("this CPU runs every level")
    monkeypatch.setenv(cpu_features.ENV_ISA, "avx512")
    model = tiny_config(MODEL, build_tiny_llama(tmp_path / "tiny"))
    with pytest.raises(AssertionError) as raised:  # start_server: the process exited
        proc, _ = start_server(tmp_path, [model], self_test_interval_s=0)
        stop(proc)
    message = str(raised.value)
    assert "BUDRT_CPU_ISA=avx512: this CPU" in message and "lacks avx512f" in message, message
