"""Load-balancing strategies: which available replica of a deployment gets the next request.

- least_outstanding (default): fewest requests in flight through this gateway.
- p2c: power of two choices; two random replicas, the less loaded wins (no herd on one).
- weighted_rr: smooth weighted round robin (nginx's), in proportion to configured weights.
- affinity: consistent hashing of the prompt prefix or `user` onto a ring, with bounded load
  (a replica is skipped while it holds more than `c` times its fair share), so a model server's
  prefix cache keeps being hit without one hot prefix overloading one replica.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Replica(Protocol):
    outstanding: int


R = TypeVar("R", bound=Replica)

VNODES = 64  # ring points per replica: smooths the key distribution
LOAD_BOUND = 1.25  # affinity: at most 25% above the mean load (Mirrokni et al., bounded loads)
PREFIX_CHARS = 256


def least_outstanding(candidates: Sequence[R]) -> R:
    best = candidates[0]
    for r in candidates:
        if r.outstanding < best.outstanding:
            best = r
    return best


def p2c(candidates: Sequence[R], rng: random.Random | None = None) -> R:
    if len(candidates) == 1:
        return candidates[0]
    a, b = (rng or random).sample(candidates, 2)
    return a if a.outstanding <= b.outstanding else b


class WeightedRoundRobin:
    """Smooth WRR: each pick adds every weight to its replica's score and takes the highest."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = list(weights)
        self.current = [0.0] * len(weights)

    def pick(self, candidates: Sequence[int]) -> int:
        """`candidates`: indexes of available replicas."""
        total = 0.0
        best = candidates[0]
        for i in candidates:
            self.current[i] += self.weights[i]
            total += self.weights[i]
            if self.current[i] > self.current[best]:
                best = i
        self.current[best] -= total
        return best


def _hash(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing with bounded load over replicas identified by name."""

    def __init__(self, names: Sequence[str]) -> None:
        points = sorted((_hash(f"{name}#{v}"), i) for i, name in enumerate(names) for v in range(VNODES))
        self.hashes = [h for h, _ in points]
        self.owners = [i for _, i in points]
        self.n = len(names)

    def pick(self, key: str, loads: Sequence[int], available: Sequence[bool]) -> int | None:
        """The first replica clockwise from `key` that is available and under the load bound."""
        total = sum(loads[i] for i in range(self.n) if available[i])
        count = sum(available)
        if count == 0:
            return None
        bound = math.ceil(LOAD_BOUND * (total + 1) / count)
        start = bisect.bisect(self.hashes, _hash(key))
        seen: set[int] = set()
        for step in range(len(self.hashes)):
            i = self.owners[(start + step) % len(self.hashes)]
            if i in seen:
                continue
            seen.add(i)
            if available[i] and loads[i] < bound:
                return i
            if len(seen) == self.n:
                break
        return None


def affinity_key(data: dict, by: str) -> str | None:
    """The string to hash: `user`, or the start of the prompt (messages, prompt or input)."""
    if by == "user":
        user = data.get("user")
        return user if isinstance(user, str) and user else None
    messages = data.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        size = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                parts.append(content[:PREFIX_CHARS])  # a huge prompt is not copied whole
                size += len(content)
                if size >= PREFIX_CHARS:
                    break
        return "\x00".join(parts)[:PREFIX_CHARS] or None
    prompt = data.get("prompt", data.get("input"))
    return prompt[:PREFIX_CHARS] if isinstance(prompt, str) and prompt else None
