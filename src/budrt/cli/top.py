"""`budrt top`: a live view of a running platform, per model: replicas and their zones, requests
in flight, requests/s, errors/s, tokens/s and warnings. It reads what any operator's tool would:
the gateway's `/metrics` and `GET /admin/replicas` (a key holding `replicas:list`)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from budrt.cli.common import ConfigFile, Home, fail, load

if TYPE_CHECKING:  # imported by `top` itself: every other command (`budrt serve`) starts sooner
    import httpx

top_app = typer.Typer()

Samples = dict[str, dict[str, float]]  # metric -> model -> value (summed over other labels)
_WANTED = {
    "budrt_gateway_requests": "requests",
    "budrt_gateway_tokens": "tokens",
    "budrt_gateway_model_in_flight_requests": "in_flight",
}


def scrape(client: httpx.Client) -> Samples:
    """The gateway's per-model counters and gauges, with errors (status ≥ 500) apart."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(client.get("/metrics").text):
        name = _WANTED.get(family.name)
        if name is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            model = sample.labels.get("model", "?")
            out[name][model] += sample.value
            if name == "requests" and sample.labels.get("status", "").startswith("5"):
                out["errors"][model] += sample.value
    return out


def snapshot(client: httpx.Client, interval_s: float) -> list[dict[str, Any]]:
    """One row per model: two scrapes `interval_s` apart give the rates."""
    before = scrape(client)
    time.sleep(interval_s)
    after = scrape(client)
    response = client.get("/admin/replicas")
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", response.text[:200])
        fail(f"GET /admin/replicas: HTTP {response.status_code}: {message}", 1)
    spread = {row["model"]: row for row in response.json().get("models", [])}
    models = sorted(set(spread) | set(after["requests"]) - {"unknown"})

    def rate(metric: str, model: str) -> float:
        return (after[metric][model] - before[metric][model]) / interval_s

    return [
        {
            "model": model,
            "replicas": spread.get(model, {}).get("replicas", 0),
            "zones": spread.get(model, {}).get("zones", {}),
            "in_flight": int(after["in_flight"][model]),
            "requests_per_s": round(rate("requests", model), 2),
            "errors_per_s": round(rate("errors", model), 2),
            "tokens_per_s": round(rate("tokens", model), 1),
            "warnings": spread.get(model, {}).get("warnings", []),
        }
        for model in models
    ]


def _table(rows: list[dict[str, Any]], url: str) -> Any:
    from rich.table import Table

    table = Table(title=f"budrt top: {url} ({time.strftime('%H:%M:%S')})")
    for column in ("model", "replicas", "zones", "in flight", "req/s", "5xx/s", "tokens/s", "warnings"):
        table.add_column(column, justify="right" if column not in ("model", "zones", "warnings") else "left")
    for r in rows:
        zones = ", ".join(f"{z} {n}" for z, n in sorted(r["zones"].items()))
        table.add_row(
            r["model"],
            str(r["replicas"]),
            zones,
            str(r["in_flight"]),
            f"{r['requests_per_s']:.1f}",
            f"{r['errors_per_s']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            "; ".join(r["warnings"]),
            style="red" if r["warnings"] or r["errors_per_s"] else None,
        )
    return table


Url = Annotated[str | None, typer.Option("--url", help="The gateway (default: this platform's).")]
Key = Annotated[str | None, typer.Option("--key", help="A key with replicas:list (default: admin.key).")]


@top_app.command()
def top(
    url: Url = None,
    key: Key = None,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between updates.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="One update, then exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: print JSON.")] = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """A live view of the running platform: per model, replicas, in flight, req/s, tokens/s."""
    import httpx

    settings = load(config, home)
    base = url or f"http://{settings.gateway.host}:{settings.gateway.port}"
    secret = key or _admin_key(settings.home)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=10) as client:
        try:
            if once:
                rows = snapshot(client, interval)
                _print_once(rows, base, as_json)
                return
            _live(client, base, interval)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the gateway at {base}: {exc}", 1)


def _print_once(rows: list[dict[str, Any]], url: str, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console

    Console().print(_table(rows, url))


def _live(client: httpx.Client, url: str, interval: float) -> None:
    from rich.live import Live

    with Live(_table([], url), auto_refresh=False) as live:
        try:
            while True:
                live.update(_table(snapshot(client, interval), url), refresh=True)
        except KeyboardInterrupt:
            pass


def _admin_key(home: Path) -> str:
    try:
        return (home / "admin.key").read_text().strip()
    except OSError:
        fail(f"no key given and no {home / 'admin.key'}: pass --key (one holding replicas:list)", 2)
