"""`budrt certs init|rotate|status`: the private CA and the certificates of the platform's own hops
(security/certs.py). `init` once (safe to repeat), `rotate` from a timer, `status` to look."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from budrt.cli.common import AsJson, ConfigFile, Home, fail, load, show

certs_app = typer.Typer(
    help="Manage the TLS certificates between the gateway and model servers.", no_args_is_help=True
)


def _checked(fn: Callable[..., Any], *args: Any) -> Any:
    """An unusable CA, a bad `tls.hosts` entry or an unwritable directory exits 1 with its message."""
    from budrt.security.certs import CertError

    try:
        return fn(*args)
    except (CertError, OSError) as exc:
        fail(str(exc), 1)


@certs_app.command("init")
def certs_init(home: Home = None, config: ConfigFile = None) -> None:
    """Make the CA (once) and the server and client certificates that are missing or due."""
    from budrt.security.certs import init

    settings = load(config, home)
    paths = _checked(init, settings.tls, settings.home)
    typer.echo(f"CA: {paths.ca}\nserver: {paths.server_cert}\nclient: {paths.client_cert}")


@certs_app.command("rotate")
def certs_rotate(
    force: Annotated[bool, typer.Option("--force", help="Reissue even if not due.")] = False,
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Reissue the server and client certificates that are due, under the same CA."""
    from budrt.security.certs import rotate

    settings = load(config, home)
    reissued = _checked(rotate, settings.tls, settings.home, force)
    typer.echo(f"reissued: {', '.join(reissued)}" if reissued else "nothing due")


@certs_app.command("status")
def certs_status(as_json: AsJson = False, home: Home = None, config: ConfigFile = None) -> None:
    """Each certificate: subject, SANs, expiry, problems. Exits 1 when any has a problem."""
    from budrt.security.certs import cert_paths, describe

    settings = load(config, home)
    statuses = _checked(describe, cert_paths(settings.tls, settings.home), settings.tls)
    lines = []
    for s in statuses:
        expiry = f"until {s.not_after:%Y-%m-%d} ({s.days_left} days left)" if s.not_after else ""
        lines.append(f"{s.name}: {s.subject} {expiry}".rstrip())
        lines += [f"  SANs: {', '.join(s.sans)}"] if s.sans else []
        lines += [f"  problem: {problem}" for problem in s.problems]
        lines += [f"  due: {s.due}"] if s.due and not s.problems else []
    show([s.to_json() for s in statuses], as_json, "\n".join(lines))
    if any(s.problems for s in statuses):
        raise typer.Exit(1)
