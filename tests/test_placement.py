"""Placement of models on devices: the policy over plain device tables, and the model pool using it.

Devices here are data (a name, a budget, the models resident there): the policy never touches a
GPU, so two "cuda" entries are as real to it as they would be on a two-GPU host.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from budrt.config import ModelConfig, ModelServerConfig
from budrt.server.cost import estimate_cost
from budrt.server.placement import DeviceRoom, NeverFits, place
from budrt.server.residency import MemoryBudget, cuda_budgets, server_budgets
from tests.tiny_models import build_tiny_llama, tiny_config

MiB = 1 << 20


@dataclass
class Model:
    name: str
    cost_bytes: int
    last_used: float = 0.0
    in_flight: int = 0
    pinned: bool = False


def names(models: list) -> list[str]:
    return [m.name for m in models]


def test_the_device_with_the_most_free_room_wins() -> None:
    devices = [
        DeviceRoom("cuda:0", 10 * MiB, [Model("a", 6 * MiB)]),
        DeviceRoom("cuda:1", 10 * MiB, [Model("b", 2 * MiB)]),
    ]
    placement = place(devices, "new", 3 * MiB)
    assert placement is not None
    assert placement.device == "cuda:1" and placement.victims == []
    # Equal room: the first listed.
    equal = [DeviceRoom("cuda:0", 8 * MiB), DeviceRoom("cuda:1", 8 * MiB)]
    assert place(equal, "new", MiB).device == "cuda:0"  # type: ignore[union-attr]


def test_a_model_too_large_for_one_device_goes_to_the_other() -> None:
    devices = [DeviceRoom("cuda:0", 4 * MiB), DeviceRoom("cuda:1", 20 * MiB, [Model("b", 10 * MiB)])]
    placement = place(devices, "new", 6 * MiB)
    assert placement is not None and placement.device == "cuda:1" and placement.victims == []


def test_eviction_happens_on_the_device_needing_the_fewest_evictions() -> None:
    # cuda:1 holds the globally least recently used models, but freeing room there takes two
    # evictions; on cuda:0 one suffices.
    a1, a2 = Model("a1", 4 * MiB, last_used=10), Model("a2", 4 * MiB, last_used=20)
    b1, b2, b3 = Model("b1", 2 * MiB, 1), Model("b2", 2 * MiB, 2), Model("b3", 5 * MiB, 30)
    devices = [DeviceRoom("cuda:0", 10 * MiB, [a2, a1]), DeviceRoom("cuda:1", 10 * MiB, [b1, b2, b3])]
    placement = place(devices, "new", 5 * MiB)
    assert placement is not None
    assert placement.device == "cuda:0" and names(placement.victims) == ["a1"]  # its LRU one


def test_equal_evictions_prefer_the_device_left_with_more_room() -> None:
    devices = [
        DeviceRoom("cuda:0", 10 * MiB, [Model("a", 6 * MiB), Model("a-busy", 3 * MiB, in_flight=1)]),
        DeviceRoom("cuda:1", 10 * MiB, [Model("b", 9 * MiB)]),
    ]
    placement = place(devices, "new", 5 * MiB)
    assert placement is not None
    assert placement.device == "cuda:1" and names(placement.victims) == ["b"]  # 5 MiB left vs 2


def test_a_busy_or_pinned_model_is_never_evicted() -> None:
    busy = Model("busy", 6 * MiB, last_used=0, in_flight=1)  # the LRU one, but serving a request
    pinned = Model("pinned", 2 * MiB, last_used=1, pinned=True)
    idle = Model("idle", 1 * MiB, last_used=5)
    devices = [DeviceRoom("cpu", 10 * MiB, [busy, pinned, idle])]
    placement = place(devices, "new", 2 * MiB)
    assert placement is not None and names(placement.victims) == ["idle"]
    # Room held only by busy/pinned models: no placement now (the model pool waits and retries).
    assert place(devices, "new", 4 * MiB) is None
    # Once the request ends, the formerly busy model is the one to go.
    busy.in_flight = 0
    placement = place(devices, "new", 4 * MiB)
    assert placement is not None and names(placement.victims) == ["busy"]


def test_a_model_larger_than_every_device_is_refused_clearly() -> None:
    devices = [DeviceRoom("cuda:0", 8 * MiB), DeviceRoom("cuda:1", 12 * MiB, [Model("b", MiB)])]
    with pytest.raises(NeverFits) as caught:
        place(devices, "huge", 13 * MiB)
    message = str(caught.value)
    assert "huge" in message and "can never be loaded" in message and "cuda:1: 12 MiB" in message
    with pytest.raises(NeverFits):
        place([], "anything", 1)


def test_cpu_is_one_device_evicting_least_recently_used_first() -> None:
    old, mid, new = Model("old", 3 * MiB, 1), Model("mid", 3 * MiB, 2), Model("new", 3 * MiB, 3)
    devices = [DeviceRoom("cpu", 10 * MiB, [new, old, mid])]
    assert place(devices, "x", MiB) == place(devices, "x", MiB)  # deterministic
    assert place(devices, "x", MiB).victims == []  # type: ignore[union-attr]
    placement = place(devices, "x", 6 * MiB)
    assert placement is not None and placement.device == "cpu" and names(placement.victims) == ["old", "mid"]


def test_budgets_per_gpu_from_free_memory_and_utilization() -> None:
    gib = 1 << 30
    # (free, total): card 0 empty, card 1 has 30 GiB held by another process.
    budgets = cuda_budgets([(80 * gib, 80 * gib), (50 * gib, 80 * gib)], 0.9)
    assert budgets == [MemoryBudget("cuda:0", 72 * gib), MemoryBudget("cuda:1", 42 * gib)]
    assert cuda_budgets([(10 * gib, 80 * gib)], 0.5) == [MemoryBudget("cuda:0", 0)]  # never negative
    # Configured bytes: one CPU device, whatever accelerators the host has.
    server = ModelServerConfig(name="s", models=[], port=9, memory_budget_bytes=123 * MiB)
    assert server_budgets(server) == [MemoryBudget("cpu", 123 * MiB)]


def test_cost_on_cuda_counts_two_bytes_per_weight(tmp_path: Path) -> None:
    cfg = tiny_config("t", build_tiny_llama(tmp_path / "t")).model_copy(update={"dtype": "auto"})
    path = Path(cfg.source)
    fp32 = estimate_cost(cfg.model_copy(update={"dtype": "float32"}), path)
    bf16 = estimate_cost(cfg, path, "cuda:1")
    kv = cfg.kv_cache_bytes * 1.1  # the configured KV reservation (+ overhead) does not depend on dtype
    assert bf16 - kv == pytest.approx((fp32 - kv) / 2, rel=1e-6)


def test_model_pool_places_models_on_the_cpu_and_evicts_the_lru_one(tmp_path: Path) -> None:
    from budrt.server.model_pool import ModelPool

    configs = [tiny_config(n, build_tiny_llama(tmp_path / n, seed=i)) for i, n in enumerate("abc")]
    cost = estimate_cost(configs[0], Path(configs[0].source))

    async def scenario() -> None:
        pool = ModelPool(configs, [MemoryBudget("cpu", int(cost * 2.5))])
        for name in "abc":  # a, b fit; c evicts a
            hosted = await pool.acquire(name, "chat")
            pool.release(hosted)
        states = {n: (m.state, m.device) for n, m in pool.models.items()}
        assert states == {"a": ("available", "cpu"), "b": ("ready", "cpu"), "c": ("ready", "cpu")}
        assert pool.used_bytes("cpu") == pool.used_bytes() == 2 * cost
        await pool.close()

    asyncio.run(scenario())


def test_model_pool_refuses_a_model_no_device_can_hold(tmp_path: Path) -> None:
    from budrt.protocol.errors import APIError
    from budrt.server.model_pool import ModelPool

    cfg: ModelConfig = tiny_config("big", build_tiny_llama(tmp_path / "big"))

    async def scenario() -> None:
        pool = ModelPool([cfg], [MemoryBudget("cpu", 1 * MiB)])
        with pytest.raises(APIError) as caught:
            await pool.acquire("big", "chat")
        assert caught.value.status == 503 and caught.value.code == "model_too_large"
        assert "can never be loaded" in caught.value.message
        await pool.close()

    asyncio.run(scenario())
