"""Role-based access control: permissions as action x resource, with shell-style wildcards.

A permission is written `action@resource` (resource defaults to `*`), e.g.
`inference:chat@model:smollm2-*`, `keys:create`, `usage:read:team`. A principal's grants are
layered: its role(s), its owner's roles when it is a key with an owner, and the key's own
permission list. An action is allowed only when every layer allows it, so a key can never do
more than its owner.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import translate
from typing import Any, Literal

# Gateway endpoint -> action checked on `model:<name>`.
ENDPOINT_ACTIONS = {
    "/v1/chat/completions": "inference:chat",
    "/v1/completions": "inference:completion",
    "/v1/embeddings": "inference:embedding",
    "/v1/images/generations": "inference:image",
}

# Model servers that register with the gateway by heartbeat (gateway/registry.py) need
# `replicas:register` on `model:<id>` for each model and alias they announce; listing them needs
# `replicas:list`. Only `admin` has these among the built-in roles: give a server a key of a custom
# role (e.g. `replicas:register@model:*`) or an admin key narrowed by its permission list.
REPLICAS_REGISTER = "replicas:register"
REPLICAS_LIST = "replicas:list"

BUILTIN_ROLES: dict[str, tuple[str, ...]] = {
    "admin": ("*@*",),
    "developer": ("inference:*@model:*", "models:list@model:*", "usage:read:own"),
    "viewer": ("models:list@model:*", "usage:read:own"),
}
# Keys created before roles existed (and by `budrt keys create`) carry role "user".
LEGACY_ROLES = {"user": "developer"}
ROLE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


def parse_permission(text: str | dict[str, Any]) -> tuple[str, str]:
    """`"action@resource"` or `{"action": ..., "resource": ...}` -> (action, resource)."""
    if isinstance(text, dict):
        action, resource = str(text.get("action", "")), str(text.get("resource", "*"))
    else:
        action, _, resource = str(text).partition("@")
        resource = resource or "*"
    action, resource = action.strip(), resource.strip()
    if not action or any(c.isspace() for c in action + resource):
        raise ValueError(f"invalid permission {text!r}: expected 'action@resource'")
    return action, resource


def format_permission(action: str, resource: str) -> str:
    return action if resource == "*" else f"{action}@{resource}"


class PermissionSet:
    """A union of (action, resource) patterns compiled into one regex; answers are memoised."""

    __slots__ = ("permissions", "_regex", "_memo")

    def __init__(self, permissions: Iterable[str | dict[str, Any] | tuple[str, str]]) -> None:
        pairs = [p if isinstance(p, tuple) else parse_permission(p) for p in permissions]
        self.permissions = tuple(sorted(set(pairs)))
        # "action\0resource" against every "pattern\0pattern" alternative at once.
        alts = [translate(a).removesuffix(r"\Z") + "\0" + translate(r) for a, r in self.permissions]
        self._regex = re.compile("|".join(f"(?:{a})" for a in alts)) if alts else None
        self._memo: dict[tuple[str, str], bool] = {}

    def allows(self, action: str, resource: str) -> bool:
        hit = self._memo.get((action, resource))
        if hit is None:
            hit = self._regex is not None and self._regex.fullmatch(f"{action}\0{resource}") is not None
            if len(self._memo) < 4096:  # resources come from config, but bound it anyway
                self._memo[(action, resource)] = hit
        return hit

    def strings(self) -> list[str]:
        return [format_permission(a, r) for a, r in self.permissions]


def role_permissions(roles: Iterable[str], custom: dict[str, Sequence[str]]) -> PermissionSet:
    """The union of the named roles' permissions; unknown role names grant nothing."""
    perms: list[str] = []
    for role in roles:
        role = LEGACY_ROLES.get(role, role)
        perms.extend(BUILTIN_ROLES.get(role) or custom.get(role) or ())
    return PermissionSet(perms)


@dataclass(frozen=True, slots=True, eq=False)
class Principal:
    """Who is calling: an API key (maybe owned by a user) or a JWT subject."""

    kind: Literal["key", "jwt"]
    id: int | str  # key id, or "jwt:<user>"; what per-caller limits are counted against
    name: str
    key_id: int | None = None
    user: str | None = None
    team: str | None = None
    roles: tuple[str, ...] = ()
    grants: tuple[PermissionSet, ...] = ()  # every layer must allow
    models: tuple[str, ...] | None = None  # None = every model
    rpm: int | None = None
    tpm: int | None = None
    expires_at: datetime | None = None
    # Rate limits and budgets of the key, its user and its team (budrt.gateway.ratelimit.Limit).
    quotas: tuple[Any, ...] = ()
    _memo: dict[tuple[str, str], bool] = field(default_factory=dict, repr=False)

    @property
    def is_admin(self) -> bool:
        return self.can("*", "*")

    def allows(self, *names: str) -> bool:
        """True when the key's model list includes any of `names` (canonical name, alias)."""
        return self.models is None or any(n in self.models for n in names)

    def can(self, action: str, resource: str = "*") -> bool:
        hit = self._memo.get((action, resource))
        if hit is None:
            hit = bool(self.grants) and all(g.allows(action, resource) for g in self.grants)
            if len(self._memo) < 1024:
                self._memo[(action, resource)] = hit
        return hit

    def can_use_model(self, action: str, *names: str) -> bool:
        """Allowed on any of the model's names, and the key's model list includes one of them."""
        return self.allows(*names) and any(self.can(action, f"model:{n}") for n in names)
