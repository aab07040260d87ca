"""A model server started before `budrt serve` has read its settings.

The `budrt` command starts one first of all for `budrt serve` (cli/__init__.py): it imports torch,
the engine and the server's modules (~1.4 s of every model server's start) while the command
parses its arguments and the supervisor reads the settings and plans (~0.3 s), then becomes the
first model server the supervisor starts (its arguments and environment come on stdin:
protocol/spare.py). That model server is ready ~0.25 s sooner. A spare no model server took is
stopped. Until it has its orders it holds no secret: the `BUDRT_*` variables are not passed on.

Only model servers have a spare: a spare gateway too, importing while the model server imports,
slowed both on two cores (first token 2.40 against 2.33 s, bench/startup.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

from budrt.control.lifetime import die_with_parent
from budrt.protocol.spare import SPARE_FLAG, orders_line

SERVER_MODULE = ["-m", "budrt.server"]  # how a model server is started: python -m budrt.server ...


class SpareServer:
    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BUDRT_")}
        env |= {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # as every child's (supervisor.child_env)
        # Its output goes through a pipe: whether the supervisor relays lines or copies them
        # depends on settings not read yet (control/relay.py).
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, *SERVER_MODULE, SPARE_FLAG],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def take(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        """The spare as the model server `argv` starts (`python -m budrt.server ...`), in `env`;
        None if it is taken already, or has exited."""
        proc, self.proc = self.proc, None
        if proc is None or argv[1:3] != SERVER_MODULE:
            self.proc = proc
            return None
        assert proc.stdin is not None
        try:
            proc.stdin.write(orders_line(argv[3:], env))
            proc.stdin.close()
        except OSError:  # it died (a broken install fails alike in the process started instead)
            _stop(proc)
            return None
        return proc

    def discard(self) -> None:
        """Stop the spare if no model server took it."""
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
