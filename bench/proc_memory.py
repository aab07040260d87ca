"""Resident memory of a server's processes, read from /proc (Linux).

RSS counts shared pages (libraries, a file mapped by two processes) in every process that maps
them, so the sum over a process tree overstates; PSS splits each shared page between its
mappers and sums to what the tree really holds. Both are reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now (from /proc/PID/stat; the name may hold spaces)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(stat.parent.name)] = int(fields[1])
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    parents = _parents()
    tree = [pid] if pid in parents else []
    for p in tree:  # grows while iterated: breadth-first
        tree += [c for c, parent in parents.items() if parent == p]
    return tree


def _kib(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_memory(pid: int) -> dict[str, Any]:
    """RSS and PSS of one process, in MB, with its command name."""
    proc = Path(f"/proc/{pid}")
    try:
        name = (proc / "cmdline").read_text().replace("\0", " ").strip()[:120]
    except OSError:
        name = ""
    return {
        "pid": pid,
        "cmd": name,
        "rss_mb": _kib(proc / "status", "VmRSS") / 1024,
        "pss_mb": _kib(proc / "smaps_rollup", "Pss") / 1024,
    }


def tree_memory(pid: int) -> dict[str, Any]:
    """Per-process and summed RSS/PSS of `pid` and its descendants."""
    procs = [process_memory(p) for p in process_tree(pid)]
    return {
        "processes": procs,
        "rss_total_mb": sum(p["rss_mb"] for p in procs),
        "pss_total_mb": sum(p["pss_mb"] for p in procs),
    }
