"""How the supervisor hands a spare model-server process its orders (control/spare.py).

A spare is `python -m budrt.server --spare`: it imports what every model server needs, then
reads one JSON line on stdin, the command-line arguments and the environment it runs with. End of
file instead of a line means no model server needed it.
"""

from __future__ import annotations

import json
from typing import IO

SPARE_FLAG = "--spare"


def orders_line(args: list[str], env: dict[str, str]) -> bytes:
    """The line that makes a spare the model server `python -m budrt.server *args` would be."""
    return json.dumps({"args": args, "env": env}).encode() + b"\n"


def read_orders(stream: IO[str]) -> tuple[list[str], dict[str, str]] | None:
    """The arguments and environment sent by `orders_line`, or None at end of file."""
    line = stream.readline()
    if not line:
        return None
    orders = json.loads(line)
    return [str(a) for a in orders["args"]], {str(k): str(v) for k, v in orders["env"].items()}
