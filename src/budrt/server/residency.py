"""How much memory a model server may fill with models, and which idle model to evict first."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from budrt.config import ModelServerConfig

CPU_DEFAULT_SHARE = 0.8  # of physical memory, when no budget is configured


@dataclass(frozen=True)
class MemoryBudget:
    """What this server may fill on one device."""

    device: str  # "cpu" or "cuda:N"
    total_bytes: int


def server_budgets(server: ModelServerConfig) -> list[MemoryBudget]:
    """CPU: the configured bytes (else a share of RAM), one device; CUDA: one budget per GPU."""
    if server.memory_budget_bytes is not None:
        return [MemoryBudget("cpu", server.memory_budget_bytes)]
    gpus = cuda_budgets(_cuda_mem_info(), server.memory_utilization)
    if gpus:  # pragma: no cover - no GPU in CI
        return gpus
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return [MemoryBudget("cpu", int(physical * CPU_DEFAULT_SHARE))]


def cuda_budgets(mem_info: list[tuple[int, int]], utilization: float) -> list[MemoryBudget]:
    """Per GPU (`(free, total)` bytes each, as `torch.cuda.mem_get_info` gives): `utilization` of
    the card minus what other processes already hold there."""
    return [
        MemoryBudget(f"cuda:{index}", max(int(total * utilization) - (total - free), 0))
        for index, (free, total) in enumerate(mem_info)
    ]


def _cuda_mem_info() -> list[tuple[int, int]]:
    """`(free, total)` of every visible GPU; empty without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count())]  # pragma: no cover
    except Exception:  # a broken driver: serve from the CPU rather than not at all
        return []


class Resident(Protocol):
    name: str
    cost_bytes: int
    in_flight: int
    last_used: float
    pinned: bool


def pick_victims(resident: Iterable[Resident], need_bytes: int, free_bytes: int) -> list[Resident] | None:
    """Least recently used idle, unpinned models whose eviction frees `need_bytes`.

    None when even evicting every idle model would not make room (busy or pinned models hold it).
    """
    if need_bytes <= free_bytes:
        return []
    victims: list[Resident] = []
    for model in sorted(resident, key=lambda m: m.last_used):
        if model.in_flight > 0 or model.pinned:
            continue
        victims.append(model)
        free_bytes += model.cost_bytes
        if need_bytes <= free_bytes:
            return victims
    return None
