"""`budrt model-server --name NAME`: run one model server of the config alone, in the foreground.

What a container runs (deploy/helm): the settings load like `budrt gateway`'s (YAML file +
`BUDRT_*` environment), no supervisor, no runtime file. Gateways reach it through the
`deployments` of their own config (or it registers itself, when its `register_urls` are set).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from budrt.cli.common import ConfigFile, Home, fail, load

if TYPE_CHECKING:
    from budrt.config import Settings

model_server_app = typer.Typer()  # one top-level command: `budrt model-server`

Name = Annotated[str, typer.Option("--name", help="Which entry of the config's `model_servers` to run.")]
Host = Annotated[
    str | None, typer.Option("--host", help="Address to listen on (default: the entry's `host`).")
]
Port = Annotated[int | None, typer.Option("--port", help="Port to listen on (default: the entry's `port`).")]


def with_host(settings: Settings, name: str, host: str) -> Settings:
    """The settings with the model server `name` listening on `host`."""
    servers = [s.model_copy(update={"host": host}) if s.name == name else s for s in settings.model_servers]
    return settings.model_copy(update={"model_servers": servers})


@model_server_app.command("model-server")
def model_server(
    name: Name, host: Host = None, port: Port = None, home: Home = None, config: ConfigFile = None
) -> None:
    """Run one model server of the config (an entry of `model_servers`), without a supervisor."""
    settings = load(config, home)
    names = [s.name for s in settings.model_servers]
    if name not in names:  # a typo in a pod spec: say which names exist, no traceback
        known = ", ".join(names) or "none"
        fail(f"no model server named {name!r} in the configuration (configured: {known})", 2)
    if host is not None:
        settings = with_host(settings, name, host)
    from budrt.server.main import run_model_server  # torch and the engine: only when serving

    run_model_server(settings, name, port)
