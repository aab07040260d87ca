"""`budrt status`: what the supervisor last published, checked against the live processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import orjson

from budrt.config import TlsConfig
from budrt.control.supervisor import internal_key_path, status_path
from budrt.security import certs


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
    # With TLS (the supervisor says where its certificates are), model servers answer only
    # clients with the platform's client certificate.
    tls_dir = data.get("supervisor", {}).get("tls_dir")
    tls = certs.cert_paths(TlsConfig(dir=Path(tls_dir)), home) if tls_dir else None
    verify = certs.client_context(tls, with_client_cert=True) if tls is not None else True
    with httpx.Client(timeout=2.0, headers=_probe_headers(home), verify=verify) as client:
        for process in data.get("processes", []):
            if not running or not _alive(process.get("pid")):
                process["state"] = "stopped" if not running else process.get("state", "stopped")
                continue
            process["health"] = _probe(client, process)
    data["models"] = model_spread(data.get("processes", []))
    return data


def model_spread(processes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: the model-server processes serving it now, and a warning where there is one
    (its crash stops the model until the supervisor restarts it) or none."""
    serving: dict[str, list[str]] = {}
    for process in processes:
        if process.get("kind") != "model-server":
            continue
        for model in process.get("models", []):
            names = serving.setdefault(model, [])
            if process.get("state") == "ready":
                names.append(process["name"])
    rows = []
    for model, names in sorted(serving.items()):
        warnings = []
        if not names:
            warnings.append("no replica ready")
        elif len(names) == 1:
            warnings.append("single point of failure: one model-server process (set replicas: 2)")
        rows.append({"model": model, "replicas": len(names), "processes": names, "warnings": warnings})
    return rows


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
