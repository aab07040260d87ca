"""`budrt kms status|rotate|rewrap|retire`: the key-encryption keys that wrap every object's data
key (security/kms.py). The usual order: `rotate`, then `rewrap`, then `retire` the old version."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from budrt.cli.common import AsJson, ConfigFile, Home, fail, load, show

kms_app = typer.Typer(help="Manage the keys that encrypt stored objects.", no_args_is_help=True)


def _checked(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a provider or store method; a refusal or a failed check exits 1 with its message."""
    from budrt.security.kms import IntegrityError, KmsError

    try:
        return fn(*args)
    except (KmsError, IntegrityError) as exc:
        fail(str(exc), 1)


def _provider(config: Path | None, home: Path | None) -> Any:
    from budrt.security.kms import make_key_provider

    return _checked(make_key_provider, load(config, home))


@kms_app.command("status")
def kms_status(as_json: AsJson = False, home: Home = None, config: ConfigFile = None) -> None:
    """Show the provider, the key, its current version and every version."""
    info = _checked(_provider(config, home).describe)
    lines = [f"provider: {info['provider']}", f"key id: {info['key_id']}", f"current: {info['current']}"]
    lines += [f"  {v['version']}  {v['state']}  {v['created']}" for v in info["versions"]]
    show(info, as_json, "\n".join(lines))


@kms_app.command("rotate")
def kms_rotate(home: Home = None, config: ConfigFile = None) -> None:
    """Make a new key version current; objects keep their old version until `rewrap`."""
    version = _checked(_provider(config, home).rotate)
    typer.echo(f"current version: {version} (`budrt kms rewrap` moves stored objects to it)")


@kms_app.command("rewrap")
def kms_rewrap(
    prefix: Annotated[str, typer.Option("--prefix", help="Only objects whose key starts so.")] = "",
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Rewrap every object's data key under the current version (metadata only; bytes untouched):
    the platform's objects, then the model repository's."""
    from budrt.store.encrypted_objects import EncryptedObjectStore
    from budrt.store.object_stores import make_object_store, make_repository_store

    settings = load(config, home)
    if not settings.objects.encrypt:
        fail("objects.encrypt is off: nothing is encrypted, nothing to rewrap", 2)
    for label, make in (("objects", make_object_store), ("repository", make_repository_store)):
        store = _checked(make, settings)
        assert isinstance(store, EncryptedObjectStore)
        moved = _checked(store.rewrap, prefix)
        typer.echo(f"{label}: rewrapped {moved} object(s)")


@kms_app.command("retire")
def kms_retire(
    version: Annotated[str, typer.Argument(help="The key version, e.g. v1.")],
    home: Home = None,
    config: ConfigFile = None,
) -> None:
    """Refuse data keys wrapped under VERSION from now on (local keyring; rewrap first)."""
    from budrt.security.kms import LocalKeyring

    provider = _provider(config, home)
    if not isinstance(provider, LocalKeyring):
        fail("retire applies to the local keyring; AWS KMS keeps a key's older material itself", 2)
    _checked(provider.retire, version)
    typer.echo(f"retired {version}")
