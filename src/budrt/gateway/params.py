"""Parameter parsing for the admin API: typed fields of a JSON body, times, key records."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from budrt.protocol.errors import invalid_request
from budrt.store.keys import KeyRecord


def key_json(record: KeyRecord) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "role": record.role,
        "user_id": record.user_id,
        "team_id": record.team_id,
        "models": list(record.models) if record.models is not None else None,
        "permissions": list(record.permissions) if record.permissions is not None else None,
        "rpm": record.rpm,
        "tpm": record.tpm,
        "tokens_per_day": record.tokens_per_day,
        "tokens_per_month": record.tokens_per_month,
        "images_per_day": record.images_per_day,
        "images_per_month": record.images_per_month,
        "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at),
        "revoked_at": iso(record.revoked_at),
    }


def parse_time(value: str | None, param: str) -> datetime | None:
    """ISO 8601 or unix seconds; naive times are UTC."""
    if not value:
        return None
    try:
        parsed = datetime.fromtimestamp(float(value), UTC)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise invalid_request(f"'{param}' must be ISO 8601 or unix seconds.", param=param) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def str_field(data: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise invalid_request(f"'{name}' must be a non-empty string.", param=name)
    return value.strip()


def strs_field(data: dict[str, Any], name: str) -> list[str] | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise invalid_request(f"'{name}' must be a list of strings.", param=name)
    return value


def int_field(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid_request(f"'{name}' must be a positive integer.", param=name)
    return value
