"""Parameter parsing for the admin API: typed fields of a JSON body, times, names and ids in paths.

Every bound lives here, so a value no column or `datetime` can hold is a 400 naming its
parameter, never a 500 from the database or the standard library.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from budrt.protocol.errors import APIError, invalid_request
from budrt.store.quotas import INT64_MAX

MAX_NAME = 200  # the name columns (tables.py: String(200))
MAX_ITEMS = 1024  # entries of a list field (models, permissions, roles)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a NUL is refused by PostgreSQL; none belongs in a name


def parse_time(value: str | None, param: str) -> datetime | None:
    """ISO 8601 or unix seconds; naive times are UTC. Out of datetime's range (inf, nan, 1e400,
    year 10000 once in UTC) is a 400."""
    if not value:
        return None
    try:
        try:
            parsed = datetime.fromtimestamp(float(value), UTC)
        except ValueError:
            if len(value) > 64:
                raise
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise invalid_request(f"'{param}' must be ISO 8601 or unix seconds.", param=param) from None


def valid_name(value: str, max_len: int = MAX_NAME) -> bool:
    """A name the database stores as given: 1..max_len characters, no control characters."""
    return 0 < len(value) <= max_len and _CONTROL.search(value) is None


def str_field(data: dict[str, Any], name: str, required: bool = False, max_len: int = MAX_NAME) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not valid_name(value.strip(), max_len):
        raise invalid_request(
            f"'{name}' must be a non-empty string of at most {max_len} characters, none a control character.",
            param=name,
        )
    return value.strip()


def strs_field(data: dict[str, Any], name: str, max_len: int = MAX_NAME) -> list[str] | None:
    value = data.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_ITEMS
        or not all(isinstance(v, str) and valid_name(v, max_len) for v in value)
    ):
        raise invalid_request(
            f"'{name}' must be a list of at most {MAX_ITEMS} non-empty strings, each at most {max_len} long.",
            param=name,
        )
    return value


def int_field(data: dict[str, Any], name: str, maximum: int = INT64_MAX) -> int | None:
    """A positive integer up to `maximum` (what its column or its use can hold), or absent."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise invalid_request(f"'{name}' must be an integer from 1 to {maximum}.", param=name)
    return value


def query_int(raw: str | None, param: str, default: int, maximum: int) -> int:
    """A positive integer query parameter, clamped to 1..maximum (`limit=0` means 1)."""
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit():
        raise invalid_request(f"'{param}' must be a positive integer.", param=param)
    return maximum if len(raw) > 18 else min(max(int(raw), 1), maximum)


def path_name(value: str, what: str) -> str:
    """A user or team name from the path; one no name could be is simply not found."""
    if not valid_name(value):
        raise APIError(404, f"{what} {value[:100]!r} does not exist", code="not_found")
    return value


def path_id(value: str, what: str) -> int:
    """A numeric id from the path; anything else (or beyond a 64-bit column) is not found."""
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise APIError(404, f"No active {what} with id {value[:40]}.", code="not_found")
    return int(value)
