"""`budrt status` and the supervisor's restart of a killed model server."""

from __future__ import annotations

import os
import signal
import time

import openai

from budrt.engine import cpu_features
from tests.e2e.conftest import Platform


def test_status_lists_every_process(platform: Platform) -> None:
    deadline = time.time() + 30  # the supervisor publishes its probes' results once a second
    status = platform.status()
    while any(p["state"] != "ready" for p in status["processes"]) and time.time() < deadline:
        time.sleep(0.5)
        status = platform.status()
    assert status["running"] is True
    kinds = sorted(p["kind"] for p in status["processes"])
    assert kinds == ["gateway", "model-server", "model-server", "model-server"]
    for p in status["processes"]:
        assert p["pid"] > 0 and p["port"] > 0 and p["state"] == "ready"
    served = {m for p in status["processes"] if p["kind"] == "model-server" for m in p["models"]}
    assert served == {"smollm2-135m-instruct", "all-minilm-l6-v2", "shapes-diffusion"}
    for p in status["processes"]:
        if p["kind"] == "model-server":  # resident models with their memory, no health error
            assert [(r["name"], r["state"]) for r in p["resident"]] == [(p["models"][0], "ready")]
            assert p["resident"][0]["memory_bytes"] > 10 << 20
            assert p["health_error"] is None


def test_status_says_how_the_text_model_runs(platform: Platform) -> None:
    """`budrt status --json`: the text model's dtype and CPU kernel level, each with why."""
    servers = [p for p in platform.status()["processes"] if p["kind"] == "model-server"]
    [text] = [p for p in servers if "smollm2-135m-instruct" in p["models"]]
    runtime = text["resident"][0]["runtime"]
    cpu = cpu_features.detect()
    level, why = cpu_features.choose_level(cpu, None)  # the platform runs without BUDRT_* variables
    assert (runtime["kernel_level"], runtime["kernel_level_reason"]) == (level, why)
    assert runtime["kernels_loaded"] is (level is not None)
    native, dtype_why = cpu_features.bf16_rule(cpu, level)
    assert runtime["dtype"] == ("bfloat16" if native else "float32")
    assert runtime["dtype_reason"] == f"auto: {dtype_why}"


def test_killed_model_server_is_back_within_30s(platform: Platform, client: openai.OpenAI) -> None:
    before = next(p for p in platform.status()["processes"] if "smollm2-135m-instruct" in p["models"])
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.time() + 30
    answer = None
    while time.time() < deadline:
        try:
            answer = client.chat.completions.create(
                model="smollm2-135m-instruct", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
            )
            break
        except openai.APIError:
            time.sleep(0.5)
    assert answer is not None, f"not serving 30 s after SIGKILL:\n{platform.log_tail()}"
    for _ in range(20):  # the supervisor probes once a second; give it a moment to notice
        after = next(p for p in platform.status()["processes"] if p["name"] == before["name"])
        if after["state"] == "ready":
            break
        time.sleep(0.5)
    assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1
    assert after["state"] == "ready"
