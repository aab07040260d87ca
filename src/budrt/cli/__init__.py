"""`budrt`: the command line. Thin: every command loads the settings tree and calls one part.

One module per command group (`serve`: serve, gateway, status, config; `keys`; `identity`: users,
teams, roles; `models`; `kms`; `certs`; `top`; `model_server`), gathered in `app`; `common` holds
what they share, `limits` the limit options.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from budrt.control.spare import SpareServer


def main() -> None:
    """The `budrt` command. `budrt serve` starts its spare model server first of all, before this
    command's own imports and parsing (~0.15 s), and hands it to the serve command
    (control/spare.py)."""
    spare: SpareServer | None = None
    if sys.argv[1:2] == ["serve"]:
        from budrt.control.spare import SpareServer

        spare = SpareServer()
    try:
        from budrt.cli.app import app

        app(obj=spare)
    finally:
        if spare is not None:  # not taken: a bad option or config, or no model server
            spare.discard()
