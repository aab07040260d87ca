"""The gateway's OpenAPI 3.1 document, served at `GET /openapi.json` (no auth).

A plain dict built once. The OpenAI request bodies come from the pydantic models the model
servers validate with (`protocol/schemas.py`), so the document says what a server accepts; the
admin API's bodies and parameters are written out here, after `gateway/admin.py`,
`gateway/params.py` and `gateway/replicas.py`. The fuzz test (tests/test_fuzz_api.py) drives
every operation from this document.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from budrt.protocol.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from budrt.store.quotas import BUDGET_FIELDS, QUOTA_FIELDS

Schema = dict[str, Any]
INT64_MAX = 2**63 - 1
BUILTIN_ROLES = ("admin", "developer", "viewer")


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: Schema, description: str = "") -> Schema:
    return {"required": True, "description": description, "content": {"application/json": {"schema": schema}}}


def _ok(schema: Schema, description: str = "OK", status: str = "200", stream: bool = False) -> Schema:
    content: Schema = {"application/json": {"schema": schema}}
    if stream:
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": "SSE chunks, then `data: [DONE]`"}
        }
    return {status: {"description": description, "content": content}}


def _errors(*statuses: int) -> Schema:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


def _op(summary: str, responses: Schema, **extra: Any) -> Schema:
    return {"summary": summary, "responses": responses, **extra}


def _query(name: str, schema: Schema, description: str, required: bool = False) -> Schema:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


def _path(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


def _pydantic_schemas(schemas: Schema, *models: type[BaseModel]) -> None:
    """Add each model's JSON schema (and its nested models) to `schemas`."""
    for model in models:
        found = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
        schemas.update(found.pop("$defs", {}))
        schemas[model.__name__] = found


TIME = {
    "anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
    "description": "ISO 8601 (a naive time is UTC) or unix seconds",
    "examples": ["2026-01-01T00:00:00Z", 1767225600],
}
NAME = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"}
INT64 = {"type": "integer", "format": "int64", "minimum": 1, "maximum": INT64_MAX}
LIMIT = INT64


def _limit_fields(names: tuple[str, ...], nullable: bool) -> Schema:
    kind: Schema = {"anyOf": [LIMIT, {"type": "null"}]} if nullable else LIMIT
    return {name: {**kind, "description": _LIMIT_DOC[name]} for name in names}


_LIMIT_DOC = {
    "rpm": "requests per minute",
    "tpm": "tokens (prompt + completion) per minute",
    "tokens_per_day": "token budget per UTC day",
    "tokens_per_month": "token budget per calendar month (UTC)",
    "images_per_day": "image budget per UTC day",
    "images_per_month": "image budget per calendar month (UTC)",
}


def _openai_schemas(schemas: Schema) -> None:
    _pydantic_schemas(schemas, ChatCompletionRequest, CompletionRequest, EmbeddingRequest)
    schemas["ImageGenerationRequest"] = {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "prompt": {"type": "string"},
            "n": {"type": "integer", "minimum": 1, "description": "images; what image budgets count"},
            "size": {"type": "string", "examples": ["512x512"]},
            "response_format": {"type": "string", "enum": ["url", "b64_json"]},
            "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
        },
        "description": "Relayed to an image-capable upstream. With `response_format` url (the default) "
        "and no `stream`, the gateway asks for b64_json, stores the images and answers with signed URLs "
        "that work without an API key (`GET /v1/images/files/{name}`).",
    }
    schemas["Model"] = {
        "type": "object",
        "required": ["id", "object"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "task": {
                "type": "string",
                "enum": ["chat", "embedding", "image"],
                "description": "what the model does, when the gateway knows (a budrt extension)",
            },
        },
    }
    schemas["ModelList"] = {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}},
    }
    schemas["Completion"] = {
        "type": "object",
        "description": "The model server's answer, relayed unchanged (OpenAI shape, with `usage`).",
        "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "usage": ref("TokenUsage")},
    }
    schemas["TokenUsage"] = {
        "type": "object",
        "properties": {
            n: {"type": "integer"} for n in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }


def _usage_schemas(schemas: Schema) -> None:
    sums = {
        n: {"type": "integer"} for n in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
    }
    sums["cache_hits"] = {"type": "integer"}
    sums["images"] = {"type": "integer", "description": "images generated"}
    sums["pixels"] = {"type": "integer", "description": "their pixels (width x height, summed)"}
    sums["steps"] = {"type": "integer", "description": "their denoising steps, summed"}
    schemas["UsageSums"] = {"type": "object", "properties": sums}
    schemas["UsageReport"] = {
        "type": "object",
        "properties": {
            "object": {"const": "usage"},
            "group_by": {"type": "string", "enum": ["user", "team", "model", "key"]},
            "start": {"type": ["string", "null"]},
            "end": {"type": ["string", "null"]},
            "totals": ref("UsageSums"),
            "data": {"type": "array", "items": ref("UsageSums"), "description": "one row per group"},
        },
    }

    number = {"type": ["number", "null"]}
    point = {
        "t": {"type": "number", "description": "the bucket's start, unix seconds"},
        "group": {"type": ["string", "integer", "null"]},
        **{n: {"type": "integer"} for n in ("requests", "errors", "prompt_tokens", "completion_tokens")},
        "images": {"type": "integer"},
        **{f"{m}_ms_{q}": number for m in ("latency", "ttft") for q in ("p50", "p95")},
    }
    schemas["UsageSeries"] = {
        "type": "object",
        "properties": {
            "object": {"const": "usage.series"},
            "group_by": {"type": "string", "enum": ["user", "team", "model", "key"]},
            "bucket_s": {"type": "integer"},
            "start": {"type": "string"},
            "end": {"type": "string"},
            "data": {"type": "array", "items": {"type": "object", "properties": point}},
        },
    }


def _key_schemas(schemas: Schema) -> None:
    strings = {"type": "array", "items": {"type": "string", "minLength": 1}}
    schemas["KeyCreate"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": NAME,
            "user": {**NAME, "description": "owner; the key's permissions stay within the user's"},
            "team": {**NAME, "description": "team whose limits the key shares"},
            "role": {"type": "string", "default": "developer", "examples": list(BUILTIN_ROLES)},
            "models": {**strings, "description": "allow-list of models (default: every model)"},
            "permissions": {**strings, "description": "subset of the role's, `action@resource`"},
            "expires_in_s": {**INT64, "description": "seconds until the key expires (default: never)"},
            **_limit_fields(("rpm", "tpm", *BUDGET_FIELDS), nullable=False),
        },
    }
    nullable_str = {"type": ["string", "null"]}
    schemas["Key"] = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "prefix": {"type": "string", "description": "the visible start of the key"},
            "role": {"type": "string"},
            "user_id": {"type": ["integer", "null"]},
            "team_id": {"type": ["integer", "null"]},
            "models": {"type": ["array", "null"], "items": {"type": "string"}},
            "permissions": {"type": ["array", "null"], "items": {"type": "string"}},
            **{name: {"type": ["integer", "null"]} for name in QUOTA_FIELDS},
            "created_at": {"type": "string"},
            "expires_at": nullable_str,
            "revoked_at": nullable_str,
            "last_used_at": {**nullable_str, "description": "to within a minute"},
        },
    }
    schemas["NewKey"] = {
        "allOf": [ref("Key")],
        "properties": {"key": {"type": "string", "description": "the secret, shown only once"}},
    }
    schemas["LimitsUpdate"] = {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": False,
        "properties": _limit_fields(QUOTA_FIELDS, nullable=True),
        "description": "Set (positive integer) or clear (null) limits; other fields are refused.",
    }


def _identity_schemas(schemas: Schema) -> None:
    roles = {"type": "array", "items": {"type": "string", "minLength": 1}, "examples": [["developer"]]}
    limits = _limit_fields(QUOTA_FIELDS, nullable=False)
    schemas["UserCreate"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": NAME, "team": NAME, "roles": roles, **limits},
    }
    schemas["RolesUpdate"] = {"type": "object", "required": ["roles"], "properties": {"roles": roles}}
    schemas["TeamCreate"] = {"type": "object", "required": ["name"], "properties": {"name": NAME, **limits}}
    schemas["RoleCreate"] = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": NAME,
            "permissions": {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "examples": [["inference:chat@model:*", "models:list"]],
                "description": "`action[@resource]`; resources like `model:<name>`, `team:<name>`, `*`",
            },
        },
    }
    quota = {name: {"type": ["integer", "null"]} for name in QUOTA_FIELDS}
    schemas["User"] = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "team": {"type": ["string", "null"]},
            "roles": {"type": "array", "items": {"type": "string"}},
            "created_at": {"type": "string"},
            **quota,
        },
    }
    schemas["Team"] = {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "created_at": {"type": "string"},
            **quota,
        },
    }
    schemas["Role"] = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "permissions": {"type": "array", "items": {"type": "string"}},
            "builtin": {"type": "boolean"},
        },
    }
    schemas["List"] = {
        "type": "object",
        "properties": {"object": {"const": "list"}, "data": {"type": "array"}},
    }


def _replica_schemas(schemas: Schema) -> None:
    model_name = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^\S+$"}
    schemas["Heartbeat"] = {
        "type": "object",
        "required": ["url"],
        "properties": {
            "url": {
                "type": "string",
                "format": "uri",
                "maxLength": 2048,
                "examples": ["http://10.0.0.5:8101/v1"],
                "description": "the replica's OpenAI base URL (http or https, no query)",
            },
            "models": {
                "type": "array",
                "minItems": 1,
                "maxItems": 256,
                "items": {
                    "anyOf": [
                        model_name,
                        {
                            "type": "object",
                            "required": ["id"],
                            "properties": {
                                "id": model_name,
                                "aliases": {"type": "array", "items": model_name},
                                "state": {"enum": ["resident", "loading", "available", "failed"]},
                                "pinned": {"type": "boolean"},
                            },
                        },
                    ]
                },
                "description": "required unless `leaving`",
            },
            "ttl_s": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 3600,
                "description": "default 3x2 s",
            },
            "leaving": {"type": "boolean", "default": False},
        },
    }
    _model_action_schemas(schemas)


def _model_action_schemas(schemas: Schema) -> None:
    replica = {
        "type": "string",
        "format": "uri",
        "maxLength": 2048,
        "description": "one replica's URL as `GET /admin/replicas` lists it; default: every replica",
    }
    schemas["ModelAction"] = {"type": "object", "properties": {"replica": replica}}
    schemas["PinAction"] = {
        "type": "object",
        "required": ["pinned"],
        "properties": {"pinned": {"type": "boolean"}, "replica": replica},
    }
    schemas["ModelActionResult"] = {
        "type": "object",
        "properties": {
            "object": {"const": "model_action"},
            "model": {"type": "string"},
            "action": {"enum": ["load", "unload", "pin"]},
            "pinned": {"type": "boolean", "description": "pin only"},
            "ok": {"type": "boolean", "description": "every replica answered 2xx"},
            "replicas": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "replica": {"type": "string"},
                        "zone": {"type": ["string", "null"]},
                        "ok": {"type": "boolean"},
                        "status": {
                            "type": ["integer", "null"],
                            "description": "the replica's HTTP status; null: unreachable or timed out",
                        },
                        "model": {"type": ["object", "null"], "description": "its model card when ok"},
                        "error": {"type": ["object", "null"], "description": "an OpenAI-style error"},
                    },
                },
            },
        },
    }


def _components() -> Schema:
    schemas: Schema = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        }
    }
    for add in (_openai_schemas, _usage_schemas, _key_schemas, _identity_schemas, _replica_schemas):
        add(schemas)
    reasons = {
        400: "invalid request (`param` names the field)",
        401: "missing or invalid API key / token",
        403: "the caller lacks the permission",
        404: "no such model, object or path",
        409: "already exists",
        413: "request body too large",
        429: "rate limit or budget reached (`Retry-After`)",
        502: "the model server failed",
        503: "no replica available, or limits cannot be checked (`Retry-After`)",
        504: "the model server timed out",
    }
    responses = {
        f"E{status}": {"description": text, "content": {"application/json": {"schema": ref("Error")}}}
        for status, text in reasons.items()
    }
    bearer = {"type": "http", "scheme": "bearer", "description": "an API key (`budrt-...`) or a JWT"}
    return {"schemas": schemas, "responses": responses, "securitySchemes": {"bearer": bearer}}


def _openai_paths() -> Schema:
    proxied = (401, 403, 404, 413, 429, 502, 503, 504)

    def post(summary: str, body: str) -> Schema:
        return {
            "post": _op(
                summary,
                {**_ok(ref("Completion"), stream=True), **_errors(400, *proxied)},
                requestBody=_json_body(ref(body)),
            )
        }

    model = _path("model", {"type": "string", "minLength": 1}, "a model name or alias")
    usage_params = [_query("start", TIME, "from (inclusive)"), _query("end", TIME, "to (exclusive)")]
    return {
        "/v1/chat/completions": post("Chat completion (JSON, or SSE with `stream`)", "ChatCompletionRequest"),
        "/v1/completions": post("Text completion", "CompletionRequest"),
        "/v1/embeddings": post("Embeddings", "EmbeddingRequest"),
        "/v1/images/generations": post(
            "Image generation (JSON, or SSE with `stream`)", "ImageGenerationRequest"
        ),
        "/v1/images/edits": {
            "post": _op(
                "Image edit: img2img at a `strength`, inpainting with a `mask` (multipart, as the SDK sends)",
                {**_ok(ref("Completion"), stream=True), **_errors(400, *proxied)},
                requestBody=_edit_body(),
            )
        },
        "/v1/models": {"get": _op("Models the caller may use", {**_ok(ref("ModelList")), **_errors(401)})},
        "/v1/models/{model}": {
            "get": _op("One model", {**_ok(ref("Model")), **_errors(401, 404)}, parameters=[model])
        },
        "/v1/usage": {
            "get": _op(
                "The caller's own usage (a key's, or a token's user's), by model",
                {**_ok(ref("UsageReport")), **_errors(400, 401, 403)},
                parameters=usage_params,
            )
        },
        **_image_files(),
    }


def _edit_body() -> Schema:
    text = {"type": "string"}
    binary = {"type": "string", "format": "binary"}
    fields = {
        "model": text,
        "prompt": text,
        "n": {"type": "integer", "minimum": 1},
        "size": text,
        "response_format": {"type": "string", "enum": ["url", "b64_json"]},
        "strength": {"type": "number", "minimum": 0, "maximum": 1},
    }
    schema = {
        "type": "object",
        "required": ["model", "prompt", "image"],
        "properties": {**fields, "image": binary, "mask": binary},
    }
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def _image_files() -> Schema:
    name = {"type": "string", "pattern": r"^[A-Za-z0-9_-]{8,64}\.(png|jpeg|webp)$"}
    images = {
        t: {"schema": {"type": "string", "format": "binary"}}
        for t in ("image/png", "image/jpeg", "image/webp")
    }
    parameters = [
        _path("name", name, "the image's id and extension, as in its URL"),
        _query("expires", {"type": "integer", "minimum": 0}, "unix time the URL expires", required=True),
        _query("sig", {"type": "string"}, "the URL's signature (HMAC-SHA256, base64url)", required=True),
    ]
    ok = {
        "200": {
            "description": "the image (`Cache-Control: private` until the URL expires)",
            "content": images,
        }
    }
    summary = "A generated image, by the signed URL an image generation answered with (no API key)"
    return {
        "/v1/images/files/{name}": {
            "get": _op(summary, {**ok, **_errors(403, 404)}, parameters=parameters, security=[])
        }
    }


def _health_paths() -> Schema:
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "/health/live": {"get": _op("The process answers", _ok(status), security=[])},
        "/health/ready": {
            "get": _op(
                "Every deployment has a ready replica (scope=models, the default), or this gateway "
                "has checked its model servers once (scope=gateway: a gateway pod's readiness)",
                {**_ok(status), **_errors(400, 503)},
                security=[],
                parameters=[
                    _query(
                        "scope",
                        {"type": "string", "enum": ["models", "gateway"], "default": "models"},
                        "What must be ready: every model, or this gateway",
                    )
                ],
            )
        },
        "/metrics": {
            "get": _op("Prometheus metrics", {"200": {"description": "OK", "content": text}}, security=[])
        },
        "/openapi.json": {
            "get": _op(
                "This document",
                {"200": {"description": "OK", "content": {"application/json": {}}}},
                security=[],
            )
        },
    }


def _admin_usage_and_keys() -> Schema:
    group_by = {"type": "string", "enum": ["user", "team", "model", "key"], "default": "model"}
    key_id = _path("key_id", INT64, "the key's id")
    list_ok = {**_ok(ref("List")), **_errors(401, 403)}
    return {
        "/admin/usage": {
            "get": _op(
                "Usage report (`usage:read:all`, or `usage:read:team` for the caller's team)",
                {**_ok(ref("UsageReport")), **_errors(400, 401, 403)},
                parameters=[
                    _query("group_by", group_by, "grouping"),
                    _query("user", {"type": "string"}, "only this user's requests"),
                    _query("team", {"type": "string"}, "only this team's requests"),
                    _query("start", TIME, "from (inclusive)"),
                    _query("end", TIME, "to (exclusive)"),
                ],
            )
        },
        "/admin/usage/series": {
            "get": _op(
                "Usage per time bucket and group, over the widest usage the caller may read "
                "(`usage:read:all`, its team's with `usage:read:team`, else its own)",
                {**_ok(ref("UsageSeries")), **_errors(400, 401, 403)},
                parameters=[
                    _query("group_by", group_by, "grouping"),
                    _query("bucket_s", {"type": "integer", "minimum": 1, "maximum": 86400}, "bucket width"),
                    _query("team", {"type": "string"}, "only this team's requests"),
                    _query("start", TIME, "from (inclusive); default: an hour before end"),
                    _query("end", TIME, "to (exclusive); default: now"),
                ],
            )
        },
        "/admin/keys": {
            "post": _op(
                "Create a key (`keys:create`); the secret is in the answer only",
                {**_ok(ref("NewKey"), "Created", "201"), **_errors(400, 401, 403, 404, 409)},
                requestBody=_json_body(ref("KeyCreate")),
            ),
            "get": _op("List keys (`keys:list`)", list_ok),
        },
        "/admin/keys/{key_id}": {
            "delete": _op(
                "Revoke a key (`keys:revoke`)",
                {**_ok(ref("Key")), **_errors(401, 403, 404)},
                parameters=[key_id],
            ),
            "patch": _op(
                "Set or clear a key's limits (`keys:update`)",
                {**_ok(ref("Key")), **_errors(400, 401, 403, 404)},
                parameters=[key_id],
                requestBody=_json_body(ref("LimitsUpdate")),
            ),
        },
    }


def _admin_identity() -> Schema:
    name = _path("name", {"type": "string", "minLength": 1}, "the user's or team's name")
    list_ok = {**_ok(ref("List")), **_errors(401, 403)}
    limits_body = _json_body(ref("LimitsUpdate"))

    def create(summary: str, body: str, out: str) -> Schema:
        responses = {**_ok(ref(out), "Created", "201"), **_errors(400, 401, 403, 404, 409)}
        return _op(summary, responses, requestBody=_json_body(ref(body)))

    def update(summary: str, out: str, body: Schema) -> Schema:
        return _op(
            summary, {**_ok(ref(out)), **_errors(400, 401, 403, 404)}, parameters=[name], requestBody=body
        )

    audit_limit = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
    return {
        "/admin/users": {
            "post": create("Create a user (`users:create`, `roles:assign` per role)", "UserCreate", "User"),
            "get": _op("List users (`users:list`)", list_ok),
        },
        "/admin/users/{name}": {
            "patch": update("Set or clear a user's limits (`users:update`)", "User", limits_body)
        },
        "/admin/users/{name}/roles": {
            "put": update(
                "Replace a user's roles (`users:update`, `roles:assign` on each role added or removed)",
                "User",
                _json_body(ref("RolesUpdate")),
            )
        },
        "/admin/teams": {
            "post": create("Create a team (`teams:create`)", "TeamCreate", "Team"),
            "get": _op("List teams (`teams:list`)", list_ok),
        },
        "/admin/teams/{name}": {
            "patch": update("Set or clear a team's limits (`teams:update`)", "Team", limits_body)
        },
        "/admin/roles": {
            "post": create("Create a custom role (`roles:create`)", "RoleCreate", "Role"),
            "get": _op("List roles, built-in and custom (`roles:list`)", list_ok),
        },
        "/admin/audit": {
            "get": _op(
                "The audit log, newest first (`audit:read`)",
                {**_ok(ref("List")), **_errors(400, 401, 403)},
                parameters=[
                    _query("limit", audit_limit, "entries (1-1000)"),
                    *(
                        _query(name, {"type": "string", "maxLength": 200}, f"whose {name} contains it")
                        for name in ("actor", "action", "target")
                    ),
                    _query("start", TIME, "from (inclusive)"),
                    _query("end", TIME, "to (exclusive)"),
                ],
            )
        },
    }


def _admin_replicas() -> Schema:
    url = _query("url", {"type": "string", "format": "uri"}, "the replica's base URL", required=True)
    return {
        **_admin_model_actions(),
        "/admin/replicas/heartbeat": {
            "post": _op(
                "A model server announces (or, with `leaving`, withdraws) its models (`replicas:register`)",
                {**_ok({"type": "object"}), **_errors(400, 401, 403, 409)},
                requestBody=_json_body(ref("Heartbeat")),
            )
        },
        "/admin/replicas": {
            "get": _op(
                "Replicas registered by heartbeat (`replicas:list`)",
                {**_ok(ref("List")), **_errors(401, 403)},
            ),
            "delete": _op(
                "Deregister a replica (`replicas:register` on its models)",
                {**_ok({"type": "object"}), **_errors(400, 401, 403, 404)},
                parameters=[url],
            ),
        },
    }


def _admin_model_actions() -> Schema:
    model = _path("model", {"type": "string", "minLength": 1}, "the model's name or alias")
    replica = _query("replica", {"type": "string", "format": "uri"}, "one replica (default: every one)")
    optional = {"required": False, "content": {"application/json": {"schema": ref("ModelAction")}}}
    done = {**_ok(ref("ModelActionResult")), **_errors(400, 401, 403, 404)}
    summaries = {
        "load": "Load the model on its replicas (`models:manage`); each answers 202 loading or 200 resident",
        "unload": "Evict the model from its replicas (`models:manage`); 409 per replica while busy or pinned",
        "pin": "Pin or unpin the model on its replicas (`models:manage`): pinned, never evicted for room",
    }
    paths = {}
    for action, summary in summaries.items():
        body = _json_body(ref("PinAction")) if action == "pin" else optional
        operation = _op(summary, done, parameters=[model, replica], requestBody=body)
        paths[f"/admin/replicas/models/{{model}}/{action}"] = {"post": operation}
    return paths


@functools.cache
def openapi() -> Schema:
    """The document (built on first use, then shared: do not mutate it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("budrt")
    except PackageNotFoundError:  # running from a source tree
        release = "0"
    paths = {
        **_openai_paths(),
        **_health_paths(),
        **_admin_usage_and_keys(),
        **_admin_identity(),
        **_admin_replicas(),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "budrt gateway",
            "version": release,
            "description": "OpenAI-compatible API (`/v1`) and admin API (`/admin`) of a budrt gateway. "
            "Errors have the OpenAI shape `{error: {message, type, param, code}}`.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": _components(),
    }


@functools.cache
def _body() -> bytes:
    return orjson.dumps(openapi())


async def openapi_endpoint(request: Request) -> Response:
    return Response(_body(), media_type="application/json")
