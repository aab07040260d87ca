"""`budrt status`: what the supervisor last published, checked against the live processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import orjson

from budrt.control.supervisor import internal_key_path, status_path


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def platform_status(home: Path) -> dict[str, Any]:
    path = status_path(home)
    if not path.exists():
        return {"running": False, "home": str(home), "processes": []}
    data = orjson.loads(path.read_bytes())
    supervisor_pid = data.get("supervisor", {}).get("pid")
    running = bool(data.get("running")) and _alive(supervisor_pid)
    data["running"] = running
    with httpx.Client(timeout=2.0, headers=_probe_headers(home)) as client:
        for process in data.get("processes", []):
            if not running or not _alive(process.get("pid")):
                process["state"] = "stopped" if not running else process.get("state", "stopped")
                continue
            process["health"] = _probe(client, process)
    return data


def _probe_headers(home: Path) -> dict[str, str]:
    """Model servers answer their readiness only to holders of the run's internal key."""
    try:
        key = internal_key_path(home).read_text().strip()
    except OSError:
        return {}
    return {"Authorization": f"Bearer {key}"} if key else {}


def _probe(client: httpx.Client, process: dict[str, Any]) -> dict[str, Any]:
    try:
        response = client.get(f"{process['url']}/health/ready")
    except httpx.HTTPError as exc:
        return {"ready": False, "error": type(exc).__name__}
    try:
        body = response.json()
    except ValueError:
        body = None
    result: dict[str, Any] = {"ready": response.status_code == 200}
    if isinstance(body, dict):
        for key in ("models", "healthy", "error", "resident"):
            if key in body:
                result[key] = body[key]
        if "resident" in body:  # fresher than what the supervisor last published
            process["resident"] = body["resident"]
    return result
