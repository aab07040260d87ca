"""`budrt models push|ls|rm`: the model registry and repository from the command line.

A pushed model is served by naming it in a model config: `source: registry:<name>`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from budrt.cli.common import AsJson, ConfigFile, Home, fail, model_store
from budrt.model_source import resolve_source

if TYPE_CHECKING:
    from budrt.store.repository import Progress

models_app = typer.Typer(help="Manage the model registry and repository.", no_args_is_help=True)


def _params(values: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values parsed as JSON when they are JSON (numbers, booleans)."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--param expects key=value, got {item!r}", 2)
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _guess_format(source: str) -> str:
    if source.endswith(".gguf"):
        return "gguf"
    try:
        path = resolve_source(source)
    except (FileNotFoundError, ValueError):
        return "safetensors"  # push reports the missing source
    if (path / "modules.json").exists():
        return "sentence-transformers"
    if (path / "model_index.json").exists():
        return "diffusers"
    return "safetensors"


@models_app.command("push")
def models_push(
    path: Annotated[str, typer.Argument(help="A model file or directory, or package:<pkg>/<path>.")],
    name: Annotated[str, typer.Option("--name", help="The model's name.")],
    task: Annotated[str, typer.Option("--task", help="chat, embedding or image.")] = "chat",
    format: Annotated[
        str | None,
        typer.Option(
            "--format", help="gguf, safetensors, sentence-transformers, diffusers (default: guessed)."
        ),
    ] = None,
    alias: Annotated[list[str] | None, typer.Option("--alias", help="Another name (repeatable).")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Default parameter key=value.")] = None,
    as_json: AsJson = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Upload a model into the repository and register it."""
    store = model_store(config, home)
    try:
        with _push_progress(path) as progress:
            info = store.push(
                path, name, task, format or _guess_format(path), alias or [], _params(param or []), progress
            )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    if as_json:
        typer.echo(json.dumps(info.to_json()))
    else:
        typer.echo(f"pushed {info.name}: sha256:{info.digest} ({info.size_bytes} bytes); serve it with")
        typer.echo(f"  source: registry:{info.name}")


@contextmanager
def _push_progress(source: str) -> Iterator[Progress | None]:
    """Two bars on a terminal's stderr, bytes read (hashed) and bytes uploaded; nothing when
    stderr is not a terminal (scripts, --json) or the source cannot be sized."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
    from rich.progress import Progress as Bars

    console = Console(stderr=True)
    try:
        root = resolve_source(source)
    except (ValueError, FileNotFoundError):
        root = None
    if root is None or not console.is_terminal:
        yield None
        return
    from budrt.store.repository import files_to_push

    total = sum(f.stat().st_size for _, f in files_to_push(root))
    columns = (TextColumn("{task.description:>9}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Bars(*columns, console=console, transient=True) as bars:
        tasks = {phase: bars.add_task(phase, total=total) for phase in ("read", "upload")}
        yield lambda phase, n: bars.advance(tasks[phase], n)


@models_app.command("ls")
def models_ls(as_json: AsJson = False, home: Home = None, config: ConfigFile = None) -> None:
    """List registered models."""
    records = [m.to_json() for m in model_store(config, home).list()]
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    for r in records:
        size = f"{r['size_bytes'] / 2**20:.1f} MiB"
        typer.echo(f"{r['name']:<28} {r['task']:<10} {r['format']:<22} {size:>11}  sha256:{r['digest'][:12]}")


@models_app.command("rm")
def models_rm(
    name: Annotated[str, typer.Argument(help="The model's name.")],
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Unregister a model and delete its artifact (unless another model shares its bytes)."""
    info = model_store(config, home).remove(name)
    if info is None:
        fail(f"no model named {name!r}", 1)
    typer.echo(f"removed {info.name} (sha256:{info.digest[:12]})")
