"""Where a model goes: the device with the most room that fits it, evicting as few models as possible.

A pure policy over a device table (each device's budget and its resident models), so it is tested
with plain numbers. The model pool (server/model_pool.py) builds the table from its own
accounting (estimated costs, not live allocator readings), which keeps the decision deterministic
and cheap. CPU is one device with the configured bytes; a CUDA server has one entry per GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from budrt.server.residency import Resident, pick_victims


@dataclass
class DeviceRoom:
    device: str  # "cpu" or "cuda:N"
    total_bytes: int  # this server's budget on the device
    resident: Sequence[Resident] = ()  # models loaded there

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - sum(m.cost_bytes for m in self.resident)


@dataclass(frozen=True)
class Placement:
    device: str
    victims: list[Resident]  # to evict from that device first (LRU order); empty if it fits now


class NeverFits(Exception):
    """The model is larger than every device's whole budget: no eviction can ever make room."""


def place(devices: Sequence[DeviceRoom], name: str, need_bytes: int) -> Placement | None:
    """The device for a model costing `need_bytes`, and which idle models to evict there.

    1. Devices where it fits now: the one with the most free room (ties: the first listed).
    2. Else the device needing the fewest evictions of idle, unpinned models (least recently used
       first); ties: the most room left afterwards.
    None when every device's room is held by busy or pinned models (wait for a request to end).
    Raises NeverFits when the model exceeds every device's total budget.
    """
    if not devices or all(need_bytes > d.total_bytes for d in devices):
        largest = max(devices, key=lambda d: d.total_bytes, default=None)
        where = f"{largest.device}: {largest.total_bytes >> 20} MiB" if largest else "no device"
        raise NeverFits(
            f"model {name} needs ~{need_bytes >> 20} MiB but the largest memory budget of this server "
            f"({where}) is smaller; it can never be loaded here"
        )
    fitting = [d for d in devices if need_bytes <= d.free_bytes]
    if fitting:
        best = max(fitting, key=lambda d: d.free_bytes)  # max() keeps the first of equals
        return Placement(best.device, [])
    options: list[tuple[int, int, int, DeviceRoom, list[Resident]]] = []
    for order, d in enumerate(devices):
        if need_bytes > d.total_bytes:
            continue
        victims = pick_victims(d.resident, need_bytes, d.free_bytes)
        if victims is not None:
            left = d.free_bytes + sum(v.cost_bytes for v in victims) - need_bytes
            options.append((len(victims), -left, order, d, victims))
    if not options:
        return None
    _, _, _, device, victims = min(options, key=lambda o: o[:3])
    return Placement(device.device, victims)


def pinned_in_the_way(devices: Sequence[DeviceRoom], need_bytes: int) -> list[str]:
    """The pinned models whose room a model costing `need_bytes` would need, when `place` found
    none: on every device whose budget could hold it, the pinned models alone leave too little.
    Empty when some device has room once its busy models finish (then waiting helps; unpinning
    is the only way otherwise, and a pinned model is never evicted to make room)."""
    names: list[str] = []
    for d in devices:
        if need_bytes > d.total_bytes:
            continue
        pinned = [m for m in d.resident if m.pinned]
        if need_bytes <= d.total_bytes - sum(m.cost_bytes for m in pinned):
            return []
        names.extend(m.name for m in pinned)
    return names
