"""The admin API (`/admin/...`) and `GET /v1/usage`: small JSON endpoints, RBAC on each.

Every change is written together with an audit entry (actor, action, target, time). The
database work runs in the threadpool: none of this is on the inference hot path.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from budrt.gateway.auth import Authenticator, forbidden, require
from budrt.gateway.metering import Meter
from budrt.gateway.params import int_field, key_json, parse_time, str_field, strs_field
from budrt.gateway.registry import ReplicaAPI
from budrt.protocol.errors import APIError, invalid_request, parse_json_body
from budrt.security.rbac import PermissionSet, Principal
from budrt.store.identity import Conflict, IdentityStore, NotFound
from budrt.store.keys import KeyRecord, KeyStore
from budrt.store.quotas import BUDGET_FIELDS, QUOTA_FIELDS
from budrt.store.usage import UsageStore

GROUPS = ("user", "team", "model", "key")


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
            Route("/admin/keys", self.create_key, methods=["POST"]),
            Route("/admin/keys", self.list_keys, methods=["GET"]),
            Route("/admin/keys/{key_id:int}", self.revoke_key, methods=["DELETE"]),
            Route("/admin/keys/{key_id:int}", self.update_key, methods=["PATCH"]),
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
        team = request.query_params.get("team") or None
        if not p.can("usage:read:all"):
            require(p, "usage:read:team")
            if p.team is None or team not in (None, p.team):
                raise forbidden("This caller may only read its own team's usage.")
            team = p.team
        user = request.query_params.get("user") or None
        start, end = self._range(request)
        if self.meter is not None:
            await self.meter.flush()
        report = await self._call(
            lambda: self.usage.report(group_by, user=user, team=team, start=start, end=end)  # type: ignore[arg-type]
        )
        head = {"object": "usage", "group_by": group_by, "start": _iso(start), "end": _iso(end)}
        return _json({**head, **report})

    def _range(self, request: Request) -> tuple[datetime | None, datetime | None]:
        q = request.query_params
        return parse_time(q.get("start"), "start"), parse_time(q.get("end"), "end")

    # -- keys --

    async def create_key(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        data = parse_json_body(await request.body())
        name = str_field(data, "name", required=True)
        user, team = str_field(data, "user"), str_field(data, "team")
        role = str_field(data, "role") or "developer"
        models, permissions = strs_field(data, "models"), strs_field(data, "permissions")
        rpm, tpm, expires_in = int_field(data, "rpm"), int_field(data, "tpm"), int_field(data, "expires_in_s")
        budgets = _limits(data, BUDGET_FIELDS)
        require(p, "keys:create", f"user:{user}" if user else f"team:{team}" if team else "key:*")
        if user is None:
            # An owned key is capped by its owner; an ownerless one is only capped by its role,
            # so handing it out needs the right to assign that role.
            require(p, "roles:assign", f"role:{role}")
        if permissions is not None:
            try:
                permissions = PermissionSet(permissions).strings()
            except ValueError as exc:
                raise invalid_request(str(exc), param="permissions") from None
        await self._call(self.identity.check_roles, [role])
        user_id = team_id = None
        if user is not None:
            user_id, team_id, _ = await self._call(self.identity.user, user)
        if team is not None:
            team_id = await self._call(self.identity.team_id, team)
        expires_at = datetime.now(UTC) + timedelta(seconds=expires_in) if expires_in else None

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
        return _json({"key": key, **key_json(record)}, status=201)

    async def list_keys(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        require(p, "keys:list")
        records = await self._call(self.keys.list)
        return _json({"object": "list", "data": [key_json(r) for r in records]})

    async def revoke_key(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        key_id: int = request.path_params["key_id"]
        require(p, "keys:revoke", f"key:{key_id}")

        def revoke() -> KeyRecord | None:
            record = self.keys.revoke(key_id)
            if record is not None:
                self.identity.record(actor(p), "keys:revoke", f"key:{key_id}")
            return record

        record = await self._call(revoke)
        if record is None:
            raise APIError(404, f"No active key with id {key_id}.", code="not_found")
        self.auth.invalidate()  # this process refuses it at once; others within the cache TTL
        return _json(key_json(record))

    async def update_key(self, request: Request) -> Response:
        """Set or clear (null) a key's limits: rpm, tpm, tokens/images per day/month."""
        p = await self.auth.authenticate(request.headers)
        key_id: int = request.path_params["key_id"]
        quota = _quota_update(parse_json_body(await request.body()))
        require(p, "keys:update", f"key:{key_id}")

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
        return _json(key_json(record))

    # -- users, teams, roles --

    async def create_user(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        data = parse_json_body(await request.body())
        name, team = str_field(data, "name", required=True), str_field(data, "team")
        roles = strs_field(data, "roles") or []
        quota = _limits(data, QUOTA_FIELDS)
        require(p, "users:create", f"user:{name}")
        for role in roles:
            require(p, "roles:assign", f"role:{role}")
        user = await self._call(self.identity.create_user, name, team, roles, actor(p), quota)
        return _json(user, status=201)

    async def update_user(self, request: Request) -> Response:
        """Set or clear (null) a user's limits: rpm, tpm, tokens/images per day/month."""
        p = await self.auth.authenticate(request.headers)
        name: str = request.path_params["name"]
        quota = _quota_update(parse_json_body(await request.body()))
        require(p, "users:update", f"user:{name}")
        result = await self._call(self.identity.update_user, name, quota, actor(p))
        self.auth.invalidate()  # this process applies them at once; others within the cache TTL
        return _json(result)

    async def list_users(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        require(p, "users:list")
        return _json({"object": "list", "data": await self._call(self.identity.list_users)})

    async def set_roles(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        data = parse_json_body(await request.body())
        roles = strs_field(data, "roles")
        if roles is None:
            raise invalid_request("'roles' must be a list of strings.", param="roles")
        name: str = request.path_params["name"]
        for role in roles:
            require(p, "roles:assign", f"role:{role}")
        result = await self._call(self.identity.set_roles, name, roles, actor(p))
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
        name: str = request.path_params["name"]
        quota = _quota_update(parse_json_body(await request.body()))
        require(p, "teams:update", f"team:{name}")
        result = await self._call(self.identity.update_team, name, quota, actor(p))
        self.auth.invalidate()
        return _json(result)

    async def list_teams(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        require(p, "teams:list")
        return _json({"object": "list", "data": await self._call(self.identity.list_teams)})

    async def create_role(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        data = parse_json_body(await request.body())
        name = str_field(data, "name", required=True)
        permissions = strs_field(data, "permissions") or []
        require(p, "roles:create", f"role:{name}")
        result = await self._call(self.identity.create_role, name, permissions, actor(p))
        self.auth.invalidate()
        return _json(result, status=201)

    async def list_roles(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        require(p, "roles:list")
        return _json({"object": "list", "data": await self._call(self.identity.list_roles)})

    async def audit(self, request: Request) -> Response:
        p = await self.auth.authenticate(request.headers)
        require(p, "audit:read")
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit():
            raise invalid_request("'limit' must be a positive integer.", param="limit")
        limit = min(max(int(raw), 1), 1000)
        return _json({"object": "list", "data": await self._call(self.identity.audit_log, limit)})


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _limits(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, int]:
    """The limit fields present in a create request (each a positive integer)."""
    found = {name: int_field(data, name) for name in names}
    return {name: value for name, value in found.items() if value is not None}


def _quota_update(data: dict[str, Any]) -> dict[str, int | None]:
    """A PATCH body: limit fields only, each a positive integer or null (unlimited)."""
    unknown = [name for name in data if name not in QUOTA_FIELDS]
    if unknown:
        allowed = ", ".join(QUOTA_FIELDS)
        raise invalid_request(f"Unknown field '{unknown[0]}'; limits are {allowed}.", param=unknown[0])
    if not data:
        raise invalid_request(f"Give at least one of {', '.join(QUOTA_FIELDS)}.")
    return {name: None if value is None else int_field(data, name) for name, value in data.items()}
