"""schemathesis hooks for tests/test_fuzz_api.py (loaded by the CLI through SCHEMATHESIS_HOOKS).

They keep the fuzz meaningful rather than make it pass: the fuzzing keys are never revoked or
throttled (that would turn every later request into a 401/429), heartbeats that the gateway
accepts register the mock upstream (a made-up URL is a replica that can never answer, so later
requests for its models are a correct 502/503), and half the inference bodies name the configured
model so they reach the upstream instead of a 404.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import schemathesis

from budrt.gateway.replicas import normalize_url
from budrt.protocol.errors import APIError

UPSTREAM = os.environ.get("FUZZ_UPSTREAM_URL", "")
MODEL = os.environ.get("FUZZ_MODEL", "")
OWN_KEY_IDS = {int(i) for i in os.environ.get("FUZZ_OWN_KEY_IDS", "").split(",") if i}
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/images/generations")
# 5xx the gateway is meant to answer when an upstream fails or a replica's heartbeat lapsed
# (documented, with Retry-After where it applies); anything else >= 500 is a bug.
UPSTREAM_CODES = {"no_healthy_upstream", "upstream_error", "upstream_timeout", "upstream_unresponsive"}


def _valid_url(value: Any) -> bool:
    try:
        normalize_url(value)
    except APIError:
        return False
    return True


def _own_key(value: Any) -> bool:
    """Whether the path names a fuzzing key, however it is spelled ("01" routes to key 1 too)."""
    text = str(value).strip()
    return text.isdecimal() and text.isascii() and int(text) in OWN_KEY_IDS


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    path, body = case.operation.path, case.body
    if path == "/admin/keys/{key_id}" and _own_key(case.path_parameters.get("key_id")):
        case.path_parameters["key_id"] = 10**6  # some other key, not ours
    if path == "/admin/replicas/heartbeat" and isinstance(body, dict) and _valid_url(body.get("url")):
        body["url"] = UPSTREAM
    if path in PROXIED and isinstance(body, dict) and "model" in body:
        if hashlib.sha256(repr(body).encode()).digest()[0] % 2:  # deterministic: same cases, same split
            body["model"] = MODEL


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 500 (or other unexpected 5xx); 502/503/504 only as a documented upstream failure."""
    if response.status_code < 500:
        return None
    code = None
    try:
        code = response.json()["error"]["code"]
    except Exception:  # not the OpenAI error shape: a failure in itself
        pass
    if response.status_code in (502, 503, 504) and code in UPSTREAM_CODES:
        return None
    raise AssertionError(f"{response.status_code} {response.text[:300]}")
