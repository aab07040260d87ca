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
    device: str  # "cpu" or "cuda:N"
    total_bytes: int

    @classmethod
    def for_server(cls, server: ModelServerConfig) -> MemoryBudget:
        """CPU: the configured bytes (else a share of RAM); CUDA: device memory x utilization."""
        if server.memory_budget_bytes is not None:
            return cls("cpu", server.memory_budget_bytes)
        cuda = _cuda_budget(server.memory_utilization)
        if cuda is not None:  # pragma: no cover - no GPU in CI
            return cuda
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls("cpu", int(physical * CPU_DEFAULT_SHARE))


def _cuda_budget(utilization: float) -> MemoryBudget | None:  # pragma: no cover - no GPU in CI
    """The device with the most room: `mem_get_info` x utilization, minus what others already use."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        best: MemoryBudget | None = None
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            room = int(total * utilization) - (total - free)
            if best is None or room > best.total_bytes:
                best = MemoryBudget(f"cuda:{index}", max(room, 0))
        return best
    except Exception:
        return None


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
