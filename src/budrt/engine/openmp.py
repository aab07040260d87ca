"""Keep one OpenMP thread pool per process busy at a time, so that torch's workers spin, not sleep.

torch's CPU build runs its parallel ops on GNU OpenMP. Every thread that has ever run a parallel
op keeps its own pool of worker threads, and once a process holds more of them than there are
CPUs, libgomp stops letting idle workers spin between parallel regions: they sleep on a futex
and are woken for each of the ~250 parallel ops of a decode step. A model server loads a model
in one thread and steps it in another, which is exactly that case: a one-row SmolLM2 step
measured 13 -> 18 ms with ~250 context switches per step, and ~0 with the idle pools released.

So torch work run off the event loop goes through `to_thread`, which releases the worker thread's
pool when the work is done, and an engine's loop releases its own while it waits for work. Releasing is
`omp_pause_resource_all`, which frees the calling thread's pool; the next parallel op builds it
again (tens of microseconds).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

_OMP_PAUSE_SOFT = 1


@functools.cache
def _pause_function() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of the libgomp torch runs on; None for other backends."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for path in (Path(torch.__file__).parent / "lib" / "libgomp.so.1", Path("libgomp.so.1")):
        try:
            # RTLD_NOLOAD: only the copy already in this process, never a second runtime.
            function = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL | os.RTLD_NOLOAD).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_int]
        function.restype = ctypes.c_int
        return function
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP workers; True if there was a runtime to ask."""
    pause = _pause_function()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0


def released(function: Callable[P, R]) -> Callable[P, R]:
    """`function`, then release this thread's OpenMP pool."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        finally:
            release_thread_pool()

    return wrapper


async def to_thread(function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`asyncio.to_thread` for torch work (loading a model, an embeddings batch): the executor
    thread lives on, so its OpenMP pool is released when the work ends."""
    return await asyncio.to_thread(released(function), *args, **kwargs)
