"""The limit options of keys, users and teams (rates, token and image budgets) and `set-limits`.

One meaning of a limit value everywhere, as in the admin API:
- on `create`, a limit is 1 or more; leave the option out for no limit (the API's POST);
- on `set-limits`, only the options given change, and 0 removes a limit (the API's null).
The upper bounds are the store's (`store/quotas.check_quota`: what each column holds).
"""

# No `from __future__ import annotations` here: `add_set_limits` builds its command's
# signature from the target argument it is given, which Typer reads at run time.

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from budrt.cli.common import AsJson, ConfigFile, Home, fail, show


def _option(flag: str, what: str, minimum: int) -> Any:
    text = f"{what}." if minimum else f"{what}; 0 removes it."
    return Annotated[int | None, typer.Option(flag, min=minimum, help=text)]


# On `create`.
Rpm = _option("--rpm", "Requests per minute", 1)
Tpm = _option("--tpm", "Tokens per minute", 1)
TokensDay = _option("--tokens-per-day", "Token budget per UTC day", 1)
TokensMonth = _option("--tokens-per-month", "Token budget per calendar month (UTC)", 1)
ImagesDay = _option("--images-per-day", "Images per UTC day", 1)
ImagesMonth = _option("--images-per-month", "Images per calendar month (UTC)", 1)
# On `set-limits`.
RpmChange = _option("--rpm", "Requests per minute", 0)
TpmChange = _option("--tpm", "Tokens per minute", 0)
TokensDayChange = _option("--tokens-per-day", "Token budget per UTC day", 0)
TokensMonthChange = _option("--tokens-per-month", "Token budget per calendar month (UTC)", 0)
ImagesDayChange = _option("--images-per-day", "Images per UTC day", 0)
ImagesMonthChange = _option("--images-per-month", "Images per calendar month (UTC)", 0)

# set-limits' update: (config, home, target, limits) -> the changed record as JSON.
Update = Callable[[Path | None, Path | None, Any, dict[str, int | None]], dict[str, Any]]


def limits(*values: int | None) -> dict[str, int | None]:
    """The limit options given, in QUOTA_FIELDS order (rpm, tpm, tokens and images per day and
    per month), by name; 0 becomes None (no limit)."""
    from budrt.store.quotas import QUOTA_FIELDS  # imports SQLAlchemy: not at `budrt --help`

    return {
        name: value or None for name, value in zip(QUOTA_FIELDS, values, strict=True) if value is not None
    }


def limits_line(data: dict[str, Any]) -> str:
    """`rpm=5 tokens_per_day=100`: the limits a record has, or `no limits`."""
    from budrt.store.quotas import QUOTA_FIELDS

    return " ".join(f"{name}={data[name]}" for name in QUOTA_FIELDS if data.get(name)) or "no limits"


def add_set_limits(group: typer.Typer, noun: str, argument: Any, doc: str, update: Update) -> None:
    """Add `set-limits TARGET [--rpm ...]` to `group`. `argument`: the annotated type of TARGET (a
    key id, a user or team name); `update` applies the change, or exits when there is no such `noun`."""

    def set_limits(
        target: argument,
        rpm: RpmChange = None,
        tpm: TpmChange = None,
        tokens_per_day: TokensDayChange = None,
        tokens_per_month: TokensMonthChange = None,
        images_per_day: ImagesDayChange = None,
        images_per_month: ImagesMonthChange = None,
        as_json: AsJson = False,
        home: Home = None,
        config: ConfigFile = None,
    ) -> None:
        given = limits(rpm, tpm, tokens_per_day, tokens_per_month, images_per_day, images_per_month)
        if not given:
            fail("give at least one limit option (see --help)", 2)
        data = update(config, home, target, given)
        show(data, as_json, f"{noun} {target}: {limits_line(data)}")

    group.command("set-limits", help=doc)(set_limits)
