"""The `budrt` command's commands: one typer app over one module per command group."""

from __future__ import annotations

import typer

from budrt.cli.certs import certs_app
from budrt.cli.identity import roles_app, teams_app, users_app
from budrt.cli.keys import keys_app
from budrt.cli.kms import kms_app
from budrt.cli.model_server import model_server_app
from budrt.cli.models import models_app
from budrt.cli.serve import config_app, serve_app
from budrt.cli.top import top_app

app = typer.Typer(help="budrt: a self-hosted OpenAI-compatible serving platform.", no_args_is_help=True)
app.add_typer(serve_app)  # no name: serve, gateway and status are top-level commands
app.add_typer(model_server_app)  # `budrt model-server`: one model server alone (containers)
app.add_typer(top_app)  # `budrt top`: a live view of a running platform
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
app.add_typer(users_app, name="users")
app.add_typer(teams_app, name="teams")
app.add_typer(roles_app, name="roles")
app.add_typer(models_app, name="models")
app.add_typer(kms_app, name="kms")
app.add_typer(certs_app, name="certs")

__all__ = ["app"]
