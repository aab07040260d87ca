"""The admin API (`/admin/...`) and `GET /v1/usage`: small JSON endpoints, RBAC on each.

Every change is written together with an audit entry (actor, action, target, time). The
database work runs in the threadpool: none of this is on the inference hot path.

Resources: a key is `key:<id>`, a user `user:<name>`, a team `team:<name>`, a role
`role:<name>`. An existing key or user is also known by its owner's and team's names, so
`keys:revoke@team:research` revokes research's keys and `users:list@team:research` lists its
members; listings show the rows the caller may see (403 when it may see none). What a caller
hands on (a role, a key's permissions, models or expiry) never exceeds what it holds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from budrt.gateway.auth import Authenticator, forbidden, require, require_any
from budrt.gateway.metering import Meter
from budrt.gateway.model_admin import ModelAdminAPI
from budrt.gateway.params import (
    int_field,
    parse_time,
    path_id,
    path_name,
    query_int,
    str_field,
    strs_field,
    valid_name,
)
from budrt.gateway.replicas import MAX_NAME as MAX_MODEL_NAME
from budrt.gateway.replicas import ReplicaAPI
from budrt.protocol.errors import APIError, invalid_request, parse_json_body
from budrt.security.rbac import MAX_PERMISSION, ROLE_NAME, PermissionSet, Principal
from budrt.store.identity import Conflict, IdentityStore, Member, NotFound
from budrt.store.keys import KeyRecord, KeyStore
from budrt.store.quotas import BUDGET_FIELDS, QUOTA_FIELDS, QUOTA_MAX
from budrt.store.usage import UsageStore

GROUPS = ("user", "team", "model", "key")
MAX_ROLE_NAME = 64  # rbac.ROLE_NAME
MAX_SERIES_BUCKET_S = 86400
MAX_SERIES_POINTS = 2000  # buckets in one series request
MAX_EXPIRES_IN_S = 100 * 366 * 86400  # a century: far enough, and a datetime can hold it


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def actor(p: Principal) -> str:
    return f"key:{p.key_id}" if p.kind == "key" else f"jwt:{p.user}"


class AdminAPI:
    def __init__(
        self,
        auth: Authenticator,
        keys: KeyStore,
        identity: IdentityStore,
        usage: UsageStore,
        meter: Meter | None,
    ) -> None:
        self.auth = auth
        self.keys = keys
        self.identity = identity
        self.usage = usage
        self.meter = meter

    def routes(self) -> list[Route]:
        return [
            Route("/v1/usage", self.own_usage, methods=["GET"]),
            Route("/admin/usage", self.usage_report, methods=["GET"]),
            Route("/admin/usage/series", self.usage_series, methods=["GET"]),
            Route("/admin/keys", self.create_key, methods=["POST"]),
            Route("/admin/keys", self.list_keys, methods=["GET"]),
            Route("/admin/keys/{key_id}", self.revoke_key, methods=["DELETE"]),
            Route("/admin/keys/{key_id}", self.update_key, methods=["PATCH"]),
            Route("/admin/users", self.create_user, methods=["POST"]),
            Route("/admin/users", self.list_users, methods=["GET"]),
            Route("/admin/users/{name}/roles", self.set_roles, methods=["PUT"]),
            Route("/admin/users/{name}", self.update_user, methods=["PATCH"]),
            Route("/admin/teams", self.create_team, methods=["POST"]),
            Route("/admin/teams", self.list_teams, methods=["GET"]),
            Route("/admin/teams/{name}", self.update_team, methods=["PATCH"]),
            Route("/admin/roles", self.create_role, methods=["POST"]),
            Route("/admin/roles", self.list_roles, methods=["GET"]),
            Route("/admin/audit", self.audit, methods=["GET"]),
            *ReplicaAPI(self.auth, self.identity).routes(),  # model servers' heartbeats
            *ModelAdminAPI(self.auth, self.identity).routes(),  # load, unload, pin on model servers
        ]

    async def _call(self, fn: Any, *args: Any) -> Any:
        """Run a store call in the threadpool; its domain errors become client errors."""
        try:
            return await run_in_threadpool(fn, *args)
        except Conflict as exc:
            raise APIError(409, str(exc), code="conflict") from None
        except NotFound as exc:
            raise APIError(404, str(exc), code="not_found") from None
        except ValueError as exc:
            raise invalid_request(str(exc)) from None

    # -- usage --

    async def own_usage(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        require(p, "usage:read:own")
        start, end = self._range(request)
        if self.meter is not None:
            await self.meter.flush()  # include this caller's most recent requests
        # A key sees its own requests; a token holder sees its user's.
        mine = {"key_id": p.key_id} if p.kind == "key" else {"user": p.user}
        report = await self._call(lambda: self.usage.report("model", start=start, end=end, **mine))
        return _json({"object": "usage", "start": _iso(start), "end": _iso(end), **report})

    async def usage_report(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        group_by = request.query_params.get("group_by", "model")
        if group_by not in GROUPS:
            raise invalid_request(f"'group_by' must be one of {', '.join(GROUPS)}.", param="group_by")
        team = _query_name(request, "team")
        if not p.can("usage:read:all"):
            require(p, "usage:read:team")
            if p.team is None or team not in (None, p.team):
                raise forbidden("This caller may only read its own team's usage.")
            team = p.team
        user = _query_name(request, "user")
        start, end = self._range(request)
        if self.meter is not None:
            await self.meter.flush()
        report = await self._call(
            lambda: self.usage.report(group_by, user=user, team=team, start=start, end=end)  # type: ignore[arg-type]
        )
        head = {"object": "usage", "group_by": group_by, "start": _iso(start), "end": _iso(end)}
        return _json({**head, **report})

    async def usage_series(self, request: Request) -> Response:
        """Per time bucket and group: requests, errors, tokens, images, latency and time to
        first byte (p50/p95), over the widest usage the caller may read (all, its team's, or its
        own). The console's overview and usage charts. Default: the last hour by minute."""
        p = await self.auth.authenticate(request.headers)
        scope = _usage_scope(p, _query_name(request, "team"))
        group_by = request.query_params.get("group_by", "model")
        if group_by not in GROUPS:
            raise invalid_request(f"'group_by' must be one of {', '.join(GROUPS)}.", param="group_by")
        q = request.query_params
        bucket_s = query_int(q.get("bucket_s"), "bucket_s", 60, MAX_SERIES_BUCKET_S)
        end = parse_time(q.get("end"), "end") or datetime.now(UTC)
        start = parse_time(q.get("start"), "start") or end - timedelta(hours=1)
        if not start < end or (end - start).total_seconds() / bucket_s > MAX_SERIES_POINTS:
            message = f"start must precede end, with at most {MAX_SERIES_POINTS} buckets between them."
            raise invalid_request(message, param="start")
        if self.meter is not None:
            await self.meter.flush()
        data = await self._call(
            lambda: self.usage.series(group_by, bucket_s, start, end, **scope)  # type: ignore[arg-type]
        )
        head = {"object": "usage.series", "group_by": group_by, "bucket_s": bucket_s}
        return _json({**head, "start": _iso(start), "end": _iso(end), "data": data})

    def _range(self, request: Request) -> tuple[datetime | None, datetime | None]:
        q = request.query_params
        return parse_time(q.get("start"), "start"), parse_time(q.get("end"), "end")

    # -- keys --

    async def create_key(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        data = parse_json_body(await request.body())
        name = str_field(data, "name", required=True)
        user, team = str_field(data, "user"), str_field(data, "team")
        role = str_field(data, "role", max_len=MAX_ROLE_NAME) or "developer"
        models = strs_field(data, "models", max_len=MAX_MODEL_NAME)
        permissions = strs_field(data, "permissions", max_len=MAX_PERMISSION)
        rpm, tpm = int_field(data, "rpm", QUOTA_MAX["rpm"]), int_field(data, "tpm", QUOTA_MAX["tpm"])
        expires_in = int_field(data, "expires_in_s", MAX_EXPIRES_IN_S)
        budgets = _limits(data, BUDGET_FIELDS)
        user_id, team_id = await self._key_owner(p, user, team)
        # Whoever holds the key gets the role (capped by an owner's roles), so handing it out
        # needs the right to assign it, owner or not; the rest must lie within the caller's own.
        require(p, "roles:assign", f"role:{role}")
        if permissions is not None:
            permissions = _grantable(p, permissions, "permissions")
        models = _models_within(p, models)
        await self._call(self.identity.check_roles, [role])
        expires_at = _expiry(p, expires_in)

        def create() -> tuple[str, KeyRecord]:
            key, record = self.keys.create(
                name,  # type: ignore[arg-type]
                role=role,
                models=models,
                rpm=rpm,
                tpm=tpm,
                expires_at=expires_at,
                user_id=user_id,
                team_id=team_id,
                permissions=permissions,
                budgets=budgets,
            )
            detail = {"role": role, "user": user, "team": team, "models": models, "permissions": permissions}
            detail.update(budgets)
            self.identity.record(actor(p), "keys:create", f"key:{record.id}", detail)
            return key, record

        key, record = await self._call(create)
        return _json({"key": key, **record.to_json()}, status=201)

    async def _key_owner(
        self, p: Principal, user: str | None, team: str | None
    ) -> tuple[int | None, int | None]:
        """(user id, team id) of a new key, once `p` may create keys there: `team:<t>` for a
        team's key, `user:<u>` or the user's team for a user's (whose team it must be)."""
        if user is None:
            require(p, "keys:create", f"team:{team}" if team else "key:*")
            return None, (await self._call(self.identity.team_id, team) if team else None)
        if team is not None:
            require(p, "keys:create", f"team:{team}")
        elif not p.may("keys:create"):
            require(p, "keys:create", f"user:{user}")  # before telling whether the user exists
        try:
            member: Member = await self._call(self.identity.member, user)
        except APIError as exc:  # unless it may reach the user by name: not told it is missing
            if exc.status == 404:
                require(p, "keys:create", f"user:{user}")
            raise
        if team is None:
            require_any(p, "keys:create", _user_resources(member.name, member.team))
        elif member.team != team:
            raise invalid_request(
                f"User {user!r} is not in team {team!r}; a user's key belongs to the user's team.",
                param="team",
            )
        return member.id, member.team_id

    async def list_keys(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        _require_listing(p, "keys:list")
        records = await self._call(self.keys.list)
        users, teams = await self._call(self.identity.directory)

        def visible(r: KeyRecord) -> bool:
            user = users.get(r.user_id) if r.user_id is not None else None
            team = teams.get(r.team_id) if r.team_id is not None else None
            return p.can_any("keys:list", _key_resources(r.id, user, team))

        shown = [r.to_json() for r in records if visible(r)]
        return _json({"object": "list", "data": shown})

    async def _authorize_key(self, p: Principal, action: str, key_id: int) -> None:
        """403 unless `p` may do `action` on the key by its id, its owner or its team."""
        if p.can(action, f"key:{key_id}"):
            return
        if p.may(action):
            record = await self._call(self.keys.get, key_id)
            if record is not None:
                owner = await self._call(self.identity.owner, record.user_id, record.team_id)
                if p.can_any(action, _key_resources(key_id, owner.user, owner.team)):
                    return
        require(p, action, f"key:{key_id}")  # a key it may not touch, or none: the same answer

    async def revoke_key(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        key_id = path_id(request.path_params["key_id"], "key")
        await self._authorize_key(p, "keys:revoke", key_id)

        def revoke() -> KeyRecord | None:
            record = self.keys.revoke(key_id)
            if record is not None:
                self.identity.record(actor(p), "keys:revoke", f"key:{key_id}")
            return record

        record = await self._call(revoke)
        if record is None:
            raise APIError(404, f"No active key with id {key_id}.", code="not_found")
        self.auth.invalidate()  # this process refuses it at once; others within the cache TTL
        return _json(record.to_json())

    async def update_key(self, request: Request) -> Response:
        """Set or clear (null) a key's limits: rpm, tpm, tokens/images per day/month."""
        p = await self.auth.authenticate(request.headers)
        key_id = path_id(request.path_params["key_id"], "key")
        quota = _quota_update(parse_json_body(await request.body()))
        await self._authorize_key(p, "keys:update", key_id)

        def update() -> KeyRecord | None:
            try:
                record = self.keys.update_limits(key_id, quota)
            except ValueError as exc:
                raise invalid_request(str(exc)) from None
            if record is not None:
                self.identity.record(actor(p), "keys:update", f"key:{key_id}", quota)
            return record

        record = await self._call(update)
        if record is None:
            raise APIError(404, f"No active key with id {key_id}.", code="not_found")
        self.auth.invalidate()  # this process applies them at once; others within the cache TTL
        return _json(record.to_json())

    # -- users, teams, roles --

    async def create_user(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        data = parse_json_body(await request.body())
        name, team = str_field(data, "name", required=True), str_field(data, "team")
        roles = strs_field(data, "roles", max_len=MAX_ROLE_NAME) or []
        quota = _limits(data, QUOTA_FIELDS)
        # Joining a team gives its usage and limits: a member of a team is the team's to create.
        require(p, "users:create", f"team:{team}" if team else f"user:{name}")
        for role in roles:
            require(p, "roles:assign", f"role:{role}")
        user = await self._call(self.identity.create_user, name, team, roles, actor(p), quota)
        return _json(user, status=201)

    async def update_user(self, request: Request) -> Response:
        """Set or clear (null) a user's limits: rpm, tpm, tokens/images per day/month."""
        p = await self.auth.authenticate(request.headers)
        name = path_name(request.path_params["name"], "user")
        quota = _quota_update(parse_json_body(await request.body()))
        if not p.may("users:update"):
            require(p, "users:update", f"user:{name}")

        def check(member: Member) -> None:
            require_any(p, "users:update", _user_resources(member.name, member.team))

        result = await self._call(self.identity.update_user, name, quota, actor(p), check)
        self.auth.invalidate()  # this process applies them at once; others within the cache TTL
        return _json(result)

    async def list_users(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        _require_listing(p, "users:list")
        users = await self._call(self.identity.list_users)
        shown = [u for u in users if p.can_any("users:list", _user_resources(u["name"], u["team"]))]
        return _json({"object": "list", "data": shown})

    async def set_roles(self, request: Request) -> Response:
        """Replace a user's roles: `users:update` on the user, and `roles:assign` on every role
        given and every role taken away (`{"roles": []}` strips roles, so it checks those)."""
        p = await self.auth.authenticate(request.headers)
        data = parse_json_body(await request.body())
        roles = strs_field(data, "roles", max_len=MAX_ROLE_NAME)
        if roles is None:
            raise invalid_request("'roles' must be a list of strings.", param="roles")
        name = path_name(request.path_params["name"], "user")
        if not p.may("users:update"):
            require(p, "users:update", f"user:{name}")
        for role in roles:
            require(p, "roles:assign", f"role:{role}")

        def check(member: Member) -> None:  # inside the transaction: the roles it replaces
            require_any(p, "users:update", _user_resources(member.name, member.team))
            for role in sorted(set(member.roles) - set(roles)):
                require(p, "roles:assign", f"role:{role}")

        result = await self._call(self.identity.set_roles, name, roles, actor(p), check)
        self.auth.invalidate()
        return _json(result)

    async def create_team(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        data = parse_json_body(await request.body())
        name = str_field(data, "name", required=True)
        quota = _limits(data, QUOTA_FIELDS)
        require(p, "teams:create", f"team:{name}")
        return _json(await self._call(self.identity.create_team, name, actor(p), quota), status=201)

    async def update_team(self, request: Request) -> Response:
        """Set or clear (null) a team's limits, shared by all its keys and users."""
        p = await self.auth.authenticate(request.headers)
        name = path_name(request.path_params["name"], "team")
        quota = _quota_update(parse_json_body(await request.body()))
        require(p, "teams:update", f"team:{name}")
        result = await self._call(self.identity.update_team, name, quota, actor(p))
        self.auth.invalidate()
        return _json(result)

    async def list_teams(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        _require_listing(p, "teams:list")
        teams = await self._call(self.identity.list_teams)
        return _json(
            {"object": "list", "data": [t for t in teams if p.can("teams:list", f"team:{t['name']}")]}
        )

    async def create_role(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        data = parse_json_body(await request.body())
        name = str_field(data, "name", required=True, max_len=MAX_ROLE_NAME)
        permissions = strs_field(data, "permissions", max_len=MAX_PERMISSION) or []
        if not ROLE_NAME.match(name):  # type: ignore[arg-type]
            raise invalid_request(
                "'name' must be up to 64 of a-z, 0-9, '_.-', starting with a letter.", param="name"
            )
        require(p, "roles:create", f"role:{name}")
        permissions = _grantable(p, permissions, "permissions")
        result = await self._call(self.identity.create_role, name, permissions, actor(p))
        self.auth.invalidate()
        return _json(result, status=201)

    async def list_roles(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        _require_listing(p, "roles:list")
        roles = await self._call(self.identity.list_roles)
        return _json(
            {"object": "list", "data": [r for r in roles if p.can("roles:list", f"role:{r['name']}")]}
        )

    async def audit(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        require(p, "audit:read")
        q = request.query_params
        limit = query_int(q.get("limit"), "limit", default=100, maximum=1000)
        contains = {name: _query_text(request, name) for name in ("actor", "action", "target")}
        start, end = self._range(request)
        entries = await self._call(
            lambda: self.identity.audit_log(
                limit, contains={k: v for k, v in contains.items() if v}, start=start, end=end
            )
        )
        return _json({"object": "list", "data": entries})


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _user_resources(name: str, team: str | None) -> tuple[str, ...]:
    return (f"user:{name}", *((f"team:{team}",) if team else ()))


def _key_resources(key_id: int, user: str | None, team: str | None) -> tuple[str, ...]:
    owners = (f"user:{user}",) if user else ()
    return (f"key:{key_id}", *owners, *((f"team:{team}",) if team else ()))


def _require_listing(p: Principal, action: str) -> None:
    """403 for a caller that may list nothing; the others see the rows they may."""
    if not p.may(action):
        require(p, action)


def _grantable(p: Principal, permissions: list[str], param: str) -> list[str]:
    """Normalised `permissions`, each within every layer of the caller's own (else 403)."""
    try:
        normalised = PermissionSet(permissions).strings()
    except ValueError as exc:
        raise invalid_request(str(exc), param=param) from None
    for perm in normalised:
        if not p.covers(perm):
            raise APIError(
                403,
                f"This {'key' if p.kind == 'key' else 'token'} may not grant '{perm}': "
                "it is not within its own permissions.",
                param=param,
                code="permission_denied",
            )
    return normalised


def _models_within(p: Principal, models: list[str] | None) -> list[str] | None:
    """A key limited to some models hands on at most those (and, by default, those)."""
    if p.models is None:
        return models
    if models is None:
        return list(p.models)
    outside = [m for m in models if m not in p.models]
    if outside:
        raise APIError(
            403, f"This key may not grant model {outside[0]!r}.", param="models", code="permission_denied"
        )
    return models


def _expiry(p: Principal, expires_in: int | None) -> datetime | None:
    """A key that expires cannot create one that outlives it (a token's short life is not
    its user's, so tokens are not held to theirs)."""
    at = datetime.now(UTC) + timedelta(seconds=expires_in) if expires_in else None
    if p.kind == "key" and p.expires_at is not None and (at is None or at > p.expires_at):
        return p.expires_at
    return at


def _usage_scope(p: Principal, team: str | None) -> dict[str, Any]:
    """The filters of the widest usage `p` may read: everything (narrowed to `team` if given),
    its own team's, or its own requests (a key's, or a token holder's user's)."""
    if p.can("usage:read:all"):
        return {"team": team}
    if p.can("usage:read:team") and p.team is not None:
        if team not in (None, p.team):
            raise forbidden("This caller may only read its own team's usage.")
        return {"team": p.team}
    require(p, "usage:read:own")
    return {"key_id": p.key_id} if p.kind == "key" else {"user": p.user}


def _query_text(request: Request, param: str, max_len: int = 200) -> str | None:
    value = request.query_params.get(param) or None
    if value is not None and (len(value) > max_len or not value.isprintable()):
        message = f"'{param}' must be printable text of at most {max_len} characters."
        raise invalid_request(message, param=param)
    return value


def _query_name(request: Request, param: str) -> str | None:
    value = request.query_params.get(param) or None
    if value is not None and not valid_name(value):
        raise invalid_request(f"'{param}' must be a name of at most 200 characters.", param=param)
    return value


def _limits(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, int]:
    """The limit fields present in a create request (each a positive integer its column holds)."""
    found = {name: int_field(data, name, QUOTA_MAX[name]) for name in names}
    return {name: value for name, value in found.items() if value is not None}


def _quota_update(data: dict[str, Any]) -> dict[str, int | None]:
    """A PATCH body: limit fields only, each a positive integer or null (unlimited)."""
    unknown = [name for name in data if name not in QUOTA_FIELDS]
    if unknown:
        allowed = ", ".join(QUOTA_FIELDS)
        raise invalid_request(
            f"Unknown field '{unknown[0][:100]}'; limits are {allowed}.", param=unknown[0][:100]
        )
    if not data:
        raise invalid_request(f"Give at least one of {', '.join(QUOTA_FIELDS)}.")
    return {
        name: None if value is None else int_field(data, name, QUOTA_MAX[name])
        for name, value in data.items()
    }
