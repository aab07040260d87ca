"""How the supervisor hands a spare model-server process its orders (control/spare.py).

A spare is `python -m budrt.server --spare`: it imports what every model server needs, then reads
one JSON line on stdin, the command-line arguments and the environment it runs with
(`await_orders`). End of file instead of a line means no model server needed it.
"""

from __future__ import annotations

import json
import os
import sys
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


def await_orders(module: str) -> list[str]:
    """In a spare `python -m MODULE --spare` that has imported what it needs: its orders'
    arguments, once it runs in their environment and its command line (what `ps` and the tests
    read) is the one it would have been started with. Exits quietly if no orders come."""
    import setproctitle

    orders = read_orders(sys.stdin)
    if orders is None:
        raise SystemExit(0)
    args, env = orders
    # The title first: setproctitle finds the command line's memory through the environment's.
    setproctitle.setproctitle(" ".join([sys.executable, "-m", module, *args]))
    os.environ.clear()
    os.environ.update(env)
    return args
