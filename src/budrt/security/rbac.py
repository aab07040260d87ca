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
from fnmatch import fnmatchcase, translate
from typing import Any, Literal

# Gateway endpoint -> action checked on `model:<name>`.
ENDPOINT_ACTIONS = {
    "/v1/chat/completions": "inference:chat",
    "/v1/completions": "inference:completion",
    "/v1/embeddings": "inference:embedding",
    "/v1/images/generations": "inference:image",
    "/v1/images/edits": "inference:image",
}

# Model servers that register with the gateway by heartbeat (gateway/replicas.py) need
# `replicas:register` on `model:<id>` for each model and alias they announce; listing them needs
# `replicas:list`. Only `admin` has these among the built-in roles: give a server a key of a custom
# role (e.g. `replicas:register@model:*`) or an admin key narrowed by its permission list.
REPLICAS_REGISTER = "replicas:register"
REPLICAS_LIST = "replicas:list"
# Loading, unloading and pinning a model on the model servers that host it
# (`POST /admin/replicas/models/<name>/load|unload|pin`, gateway/model_admin.py) needs
# `models:manage` on `model:<name>` (its canonical name). Only `admin` has it among the built-in
# roles: it changes what every caller of the model gets, so it is an operator's right.
MODELS_MANAGE = "models:manage"

BUILTIN_ROLES: dict[str, tuple[str, ...]] = {
    "admin": ("*@*",),
    "developer": ("inference:*@model:*", "models:list@model:*", "usage:read:own"),
    "viewer": ("models:list@model:*", "usage:read:own"),
}
# Keys created before roles existed (and by `budrt keys create`) carry role "user".
LEGACY_ROLES = {"user": "developer"}
ROLE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
MAX_PERMISSION = 512  # characters; bounds what one granted pattern costs to match and compare


def parse_permission(text: str | dict[str, Any]) -> tuple[str, str]:
    """`"action@resource"` or `{"action": ..., "resource": ...}` -> (action, resource)."""
    if isinstance(text, dict):
        action, resource = str(text.get("action", "")), str(text.get("resource", "*"))
    else:
        action, _, resource = str(text).partition("@")
        resource = resource or "*"
    action, resource = action.strip(), resource.strip()
    # Printable only: a NUL would let a pattern reach across the action/resource boundary.
    if not action or any(c.isspace() or not c.isprintable() for c in action + resource):
        raise ValueError(f"invalid permission {str(text)[:100]!r}: expected 'action@resource'")
    if len(action) + len(resource) > MAX_PERMISSION:
        raise ValueError(f"invalid permission {str(text)[:100]!r}: longer than {MAX_PERMISSION} characters")
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
            # A NUL in a name (a path parameter) could make "action\0resource" split elsewhere.
            ok = self._regex is not None and "\0" not in action and "\0" not in resource
            hit = ok and self._regex.fullmatch(f"{action}\0{resource}") is not None  # type: ignore[union-attr]
            if len(self._memo) < 4096:  # resources come from config, but bound it anyway
                self._memo[(action, resource)] = hit
        return hit

    def allows_action(self, action: str) -> bool:
        """True when some pattern allows `action` on some resource (a listing may show rows)."""
        return any(fnmatchcase(action, a) for a, _ in self.permissions)

    def covers(self, action: str, resource: str) -> bool:
        """True when every (action, resource) the patterns match is allowed by one of these.

        Conservative: one granted pattern must contain the new one (`a[ab]` is not covered by
        `aa` + `ab` together); never unsound (`a?` does not cover `a*`).
        """
        return any(pattern_covers(a, action) and pattern_covers(r, resource) for a, r in self.permissions)

    def strings(self) -> list[str]:
        return [format_permission(a, r) for a, r in self.permissions]


def _tokens(pattern: str) -> list[tuple[str, str]]:
    """A pattern split as `fnmatch.translate` reads it: ("star"|"one"|"set"|"lit", text)."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not out or out[-1][0] != "star":
                out.append(("star", c))
        elif c == "?":
            out.append(("one", c))
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal '['
                out.append(("lit", c))
            else:
                out.append(("set", pattern[i - 1 : j + 1]))
                i = j + 1
        else:
            out.append(("lit", c))
    return out


def _token_covers(granted: tuple[str, str], wanted: tuple[str, str]) -> bool:
    """One granted single-character token against one token of the new pattern."""
    kind, text = granted
    if wanted[0] == "star":
        return False  # only a granted '*' covers any string
    if kind == "one":
        return True  # a literal, '?' or a class: each exactly one character
    if wanted[0] != "lit":
        return False
    return text == wanted[1] if kind == "lit" else fnmatchcase(wanted[1], text)


def pattern_covers(granted: str, wanted: str) -> bool:
    """True when every string fnmatch-pattern `wanted` matches, `granted` matches too.

    The new pattern's wildcards are treated as symbols that only a granted wildcard at least as
    wide can stand for: `*` only by `*`, `?` and `[...]` by `?` or `*` (sound, may say no to a
    class covered by a wider class). Dynamic programming over both token lists.
    """
    want = _tokens(wanted)
    reach = [True] + [False] * len(want)  # reach[j]: the granted prefix so far yields want[:j]
    for token in _tokens(granted):
        if token[0] == "star":
            for j in range(1, len(reach)):
                reach[j] = reach[j] or reach[j - 1]
        else:
            reach = [False] + [reach[j] and _token_covers(token, want[j]) for j in range(len(want))]
    return reach[-1]


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

    def can_any(self, action: str, resources: Iterable[str]) -> bool:
        """Allowed on at least one of `resources` (an object known by several names)."""
        return any(self.can(action, r) for r in resources)

    def may(self, action: str) -> bool:
        """Every layer allows `action` on some resource: a listing may have rows to show."""
        return bool(self.grants) and all(g.allows_action(action) for g in self.grants)

    def covers(self, permission: str | dict[str, Any]) -> bool:
        """Every layer contains the whole of `permission`: it may be handed on (a new role, a
        key's permission list) without granting anything its giver lacks."""
        action, resource = parse_permission(permission)
        return bool(self.grants) and all(g.covers(action, resource) for g in self.grants)

    def can_use_model(self, action: str, *names: str) -> bool:
        """Allowed on any of the model's names, and the key's model list includes one of them."""
        return self.allows(*names) and any(self.can(action, f"model:{n}") for n in names)
