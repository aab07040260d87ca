"""RBAC: permission matching, role layering, and the allow/deny matrix through a real gateway."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

import httpx
import pytest

from budrt.security.rbac import (
    BUILTIN_ROLES,
    PermissionSet,
    Principal,
    parse_permission,
    pattern_covers,
    role_permissions,
)
from tests.gateway.identity import CHAT, Gateway, chat, settings, start
from tests.mock_upstream import MockUpstream, ServerThread

MODELS = ["smollm2-135m", "smollm2-360m", "llama-8b"]


def test_permission_wildcards() -> None:
    perms = PermissionSet(["inference:chat@model:smollm2-*", "keys:create", {"action": "usage:read:*"}])
    assert perms.allows("inference:chat", "model:smollm2-135m")
    assert not perms.allows("inference:chat", "model:llama-8b")
    assert not perms.allows("inference:completion", "model:smollm2-135m")
    assert perms.allows("keys:create", "user:bob")  # no resource = every resource
    assert perms.allows("usage:read:team", "*") and not perms.allows("usage:write", "*")
    assert not PermissionSet([]).allows("models:list", "model:x")
    assert parse_permission("a:b@model:c") == ("a:b", "model:c")
    for bad in ("", "@model:x", "a b"):
        with pytest.raises(ValueError):
            parse_permission(bad)
    # Pattern characters are wildcards only where written: '.' and '+' are literal.
    assert not PermissionSet(["x@model:a.b"]).allows("x", "model:aXb")


def test_pattern_covers_is_sound() -> None:
    # The unsound shortcut: a literal "a*" matches the pattern "a?", but "a?" does not hold "a*".
    assert PermissionSet(["a?"]).allows("a*", "*")
    assert not pattern_covers("a?", "a*") and not PermissionSet(["a?"]).covers("a*", "*")
    assert pattern_covers("a*", "a?") and pattern_covers("*", "x*y[0-9]?")
    assert pattern_covers("model:smollm2-*", "model:smollm2-1*")
    assert not pattern_covers("model:smollm2-*", "model:smollm*")
    assert pattern_covers("a[ab]", "aa") and not pattern_covers("a[ab]", "a?")
    assert not pattern_covers("a[ab]", "a[ab]")  # conservative: a class only by '?' or '*'
    assert pattern_covers("a?", "a[xy]") and not pattern_covers("a", "a[a]")
    assert pattern_covers("a[", "a[") and not pattern_covers("a[", "a[b]")  # unclosed: literal
    assert not pattern_covers("", "*") and pattern_covers("*", "")
    # Action and resource are covered separately, by one granted permission.
    team = PermissionSet(["keys:create@team:research", "usage:read:*"])
    assert team.covers("keys:create", "team:research") and team.covers("usage:read:team", "*")
    assert not team.covers("keys:create", "team:*") and not team.covers("keys:*", "team:research")
    assert team.covers("usage:read:team", "team:x")  # usage:read:* is on every resource
    admin, dev = role_permissions(["admin"], {}), role_permissions(["developer"], {})
    owned = Principal(kind="key", id=1, name="k", grants=(admin, dev))  # an admin key owned by a developer
    assert owned.covers("inference:chat@model:x-*") and not owned.covers("keys:create")
    assert not Principal(kind="key", id=2, name="k").covers("models:list")
    assert PermissionSet(["x@y"]).allows_action("x") and not PermissionSet(["x@y"]).allows_action("z")
    # NUL and other control characters never reach a pattern or split action from resource.
    for bad in ("a\0b", "a@b\x01"):
        with pytest.raises(ValueError):
            parse_permission(bad)
    assert not PermissionSet(["*@user:bob"]).allows("users:update\0user:x", "user:bob")


def test_pattern_covers_never_grants_more() -> None:
    """Whatever `granted` is said to cover, every string `wanted` matches, `granted` matches
    (random patterns over wildcard-heavy characters, every string up to 4 characters)."""
    rng = random.Random(14)
    texts = ["".join(c) for n in range(5) for c in itertools.product("ab[]!-", repeat=n)]
    covered = 0
    for _ in range(4000):
        granted, wanted = ("".join(rng.choices("ab*?[]!-", k=rng.randint(0, 5))) for _ in range(2))
        if pattern_covers(granted, wanted):
            covered += 1
            for text in texts:
                assert not fnmatchcase(text, wanted) or fnmatchcase(text, granted), (granted, wanted, text)
    assert covered > 100  # the check was exercised, not vacuous


ACTIONS = [
    ("inference:chat", "model:m"),
    ("inference:embedding", "model:m"),
    ("models:list", "model:m"),
    ("keys:create", "*"),
    ("usage:read:own", "*"),
    ("usage:read:all", "*"),
    ("roles:assign", "role:admin"),
]


@pytest.mark.parametrize(
    ("role", "allowed"),
    [
        ("admin", {a for a, _ in ACTIONS}),
        ("developer", {"inference:chat", "inference:embedding", "models:list", "usage:read:own"}),
        ("user", {"inference:chat", "inference:embedding", "models:list", "usage:read:own"}),  # legacy
        ("viewer", {"models:list", "usage:read:own"}),
        ("nonexistent", set()),
    ],
)
def test_builtin_role_matrix(role: str, allowed: set[str]) -> None:
    perms = role_permissions([role], {})
    assert {a for a, r in ACTIONS if perms.allows(a, r)} == allowed


def test_layers_cap_a_key_by_its_owner_and_its_permission_list() -> None:
    dev, viewer = role_permissions(["developer"], {}), role_permissions(["viewer"], {})
    subset = PermissionSet(["inference:chat@model:smollm2-*", "models:list@model:*"])
    owned_by_viewer = Principal(kind="key", id=1, name="k", grants=(dev, viewer))
    assert not owned_by_viewer.can("inference:chat", "model:smollm2-135m")
    assert owned_by_viewer.can("models:list", "model:smollm2-135m")
    limited = Principal(kind="key", id=2, name="k", grants=(dev, subset), models=("smollm2-135m",))
    assert limited.can_use_model("inference:chat", "smollm2-135m")
    assert not limited.can_use_model("inference:chat", "smollm2-360m")  # not in the key's models
    assert not limited.can_use_model("inference:embedding", "smollm2-135m")  # not in its subset
    assert Principal(kind="key", id=3, name="k", grants=(role_permissions(["admin"], {}),)).is_admin
    assert not Principal(kind="key", id=4, name="k").can("models:list")  # no grants: nothing
    assert set(BUILTIN_ROLES) == {"admin", "developer", "viewer"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    upstream = ServerThread(MockUpstream("up").app).start()
    g = start(settings(tmp_path_factory.mktemp("rbac"), upstream.url + "/v1", MODELS))
    admin, _ = g.store.create("admin", role="admin")
    yield g, admin
    g.stop()
    upstream.stop()


def _post(g: Gateway, key: str, path: str, body: dict) -> httpx.Response:
    with g.client(key) as c:
        return c.post(path, json=body)


def test_http_matrix(gw: tuple[Gateway, str]) -> None:
    g, admin = gw
    with g.client(admin) as c:
        assert (
            c.post(
                "/admin/roles",
                json={
                    "name": "smollm-chat",
                    "permissions": ["inference:chat@model:smollm2-*", "models:list@model:smollm2-*"],
                },
            ).status_code
            == 201
        )
        c.post("/admin/teams", json={"name": "research"}).raise_for_status()
        c.post(
            "/admin/users", json={"name": "vera", "team": "research", "roles": ["viewer"]}
        ).raise_for_status()
        c.post("/admin/users", json={"name": "dave", "roles": ["developer"]}).raise_for_status()
        keys = {
            "admin": admin,
            "legacy": g.store.create("legacy")[0],  # `budrt keys create`: role "user" = developer
            "viewer": c.post("/admin/keys", json={"name": "v", "role": "viewer"}).json()["key"],
            "custom": c.post("/admin/keys", json={"name": "c", "role": "smollm-chat"}).json()["key"],
            # A developer key owned by a viewer can do only what the viewer can.
            "owned-by-viewer": c.post("/admin/keys", json={"name": "o", "user": "vera"}).json()["key"],
            "owned-by-dev": c.post("/admin/keys", json={"name": "d", "user": "dave"}).json()["key"],
            "subset": c.post(
                "/admin/keys", json={"name": "s", "permissions": ["inference:chat@model:llama-*"]}
            ).json()["key"],
            "models": c.post("/admin/keys", json={"name": "m", "models": ["llama-8b"]}).json()["key"],
        }
    expected = {  # key -> status for chat on (smollm2-135m, llama-8b)
        "admin": (200, 200),
        "legacy": (200, 200),
        "viewer": (403, 403),
        "custom": (200, 403),
        "owned-by-viewer": (403, 403),
        "owned-by-dev": (200, 200),
        "subset": (403, 200),
        "models": (404, 200),  # a model the key cannot see stays "not found"
    }
    for name, key in keys.items():
        got = tuple(_post(g, key, CHAT, chat(m)).status_code for m in ("smollm2-135m", "llama-8b"))
        assert got == expected[name], name
    denied = _post(g, keys["custom"], CHAT, chat("llama-8b")).json()["error"]
    assert denied["type"] == "permission_error" and denied["code"] == "permission_denied"
    assert denied["message"] == "This key is not allowed to use chat on model `llama-8b`."
    # The same key may not use another endpoint on a model it may chat with.
    assert (
        _post(g, keys["custom"], "/v1/embeddings", {"model": "smollm2-135m", "input": "x"}).status_code == 403
    )
    listed = {
        name: sorted(m["id"] for m in g.client(key).get("/v1/models").json()["data"])
        for name, key in keys.items()
    }
    assert listed["admin"] == listed["viewer"] == sorted(MODELS)
    assert listed["custom"] == ["smollm2-135m", "smollm2-360m"]
    assert listed["models"] == ["llama-8b"]
    assert g.client(keys["custom"]).get("/v1/models/llama-8b").status_code == 404


def test_admin_api_needs_permissions(gw: tuple[Gateway, str]) -> None:
    g, admin = gw
    dev = g.store.create("dev")[0]
    with g.client(dev) as c:
        resp = c.post("/admin/keys", json={"name": "x"})
        assert resp.status_code == 403
        assert resp.json()["error"]["message"] == "This key is not allowed to keys:create on key:*."
        assert c.get("/admin/keys").status_code == 403
        assert c.post("/admin/users", json={"name": "eve", "roles": ["admin"]}).status_code == 403
        assert c.get("/admin/usage").status_code == 403
        assert c.get("/admin/audit").status_code == 403
    with g.client(admin) as c:
        assert c.post("/admin/users", json={"name": "x", "roles": ["no-such-role"]}).status_code == 404
        assert c.post("/admin/teams", json={"name": "dup"}).status_code == 201
        assert c.post("/admin/teams", json={"name": "dup"}).status_code == 409
        assert c.post("/admin/roles", json={"name": "admin", "permissions": []}).status_code == 409
        assert c.post("/admin/roles", json={"name": "bad", "permissions": ["a b"]}).status_code == 400
        assert c.post("/admin/keys", json={"name": 5}).json()["error"]["param"] == "name"
        created = c.post("/admin/keys", json={"name": "audited", "rpm": 5}).json()
        assert created["key"].startswith("budrt-") and created["rpm"] == 5 and created["role"] == "developer"
        assert any(k["id"] == created["id"] for k in c.get("/admin/keys").json()["data"])
        assert c.put("/admin/users/x-missing/roles", json={"roles": []}).status_code == 404
        log = c.get("/admin/audit").json()["data"]
    entry = next(e for e in log if e["action"] == "keys:create" and e["target"] == f"key:{created['id']}")
    assert entry["actor"].startswith("key:") and entry["at"]
    assert {"teams:create", "roles:create", "users:create"} <= {e["action"] for e in log}


def test_role_assignment_takes_effect(gw: tuple[Gateway, str]) -> None:
    g, admin = gw
    with g.client(admin) as c:
        c.post("/admin/users", json={"name": "paula", "roles": ["viewer"]}).raise_for_status()
        key = c.post("/admin/keys", json={"name": "p", "user": "paula"}).json()["key"]
        assert _post(g, key, CHAT, chat("llama-8b")).status_code == 403
        resp = c.put("/admin/users/paula/roles", json={"roles": ["developer"]})
        assert resp.json()["roles"] == ["developer"]
    assert _post(g, key, CHAT, chat("llama-8b")).status_code == 200


def test_revoked_key_refused_within_one_second(gw: tuple[Gateway, str]) -> None:
    g, admin = gw
    key, record = g.store.create("to-revoke")
    # Revoked behind the gateway's back (as another gateway or the CLI would): only the
    # cache TTL (1 s) stands between the revocation and the first refusal.
    with g.client(key) as c:
        assert c.get("/v1/models").status_code == 200
        g.store.revoke(record.id)
        revoked_at = time.monotonic()
        last_ok = revoked_at
        while True:
            sent = time.monotonic()
            status = c.get("/v1/models").status_code
            if status == 401:
                break
            last_ok = sent
            assert sent - revoked_at < 3, "never refused"
            time.sleep(0.02)
    assert last_ok - revoked_at < 1.0
    # Through the admin API the revoking gateway refuses it at once.
    key2, record2 = g.store.create("to-revoke-2")
    with g.client(admin) as c:
        assert _post(g, key2, CHAT, chat("llama-8b")).status_code == 200
        assert c.delete(f"/admin/keys/{record2.id}").json()["revoked_at"]
        assert c.delete(f"/admin/keys/{record2.id}").status_code == 404
    assert _post(g, key2, CHAT, chat("llama-8b")).status_code == 401


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from budrt.cli.app import app

    monkeypatch.setenv("BUDRT_HOME", str(tmp_path))  # the CLI exports it; restored afterwards
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, [*args, "--home", str(tmp_path)])
        assert result.exit_code == 0, result.output
        return result.stdout

    legacy = json.loads(cli("keys", "create", "--name", "a", "--models", "m1,m2", "--rpm", "5", "--json"))
    assert (legacy["role"], legacy["models"], legacy["rpm"]) == ("user", ["m1", "m2"], 5)
    cli("teams", "create", "--name", "research")
    assert "alice" in cli("users", "create", "--name", "alice", "--team", "research", "--roles", "viewer")
    cli("roles", "create", "--name", "smol", "-p", "inference:chat@model:smollm2-*")
    owned = json.loads(cli("keys", "create", "--name", "b", "--user", "alice", "--role", "smol", "--json"))
    assert owned["role"] == "smol"
    assert "alice" in cli("users", "set-roles", "alice", "--roles", "developer")
    bad = runner.invoke(app, ["keys", "create", "--name", "c", "--role", "nope", "--home", str(tmp_path)])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    assert "revoked" in cli("keys", "revoke", str(legacy["id"]))
    users = json.loads(cli("users", "list", "--json"))
    assert [(u["name"], u["team"], u["roles"]) for u in users] == [("alice", "research", ["developer"])]
    from budrt.store.database import Database
    from budrt.store.identity import IdentityStore

    db = Database(f"sqlite:///{tmp_path / 'budrt.db'}")
    actions = [(e["actor"], e["action"]) for e in IdentityStore(db).audit_log()]
    db.dispose()
    assert ("cli", "keys:revoke") in actions and ("cli", "keys:create") in actions


def test_cli_refuses_limits_beyond_their_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from budrt.cli.app import app

    monkeypatch.setenv("BUDRT_HOME", str(tmp_path))
    runner = CliRunner()

    def cli(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, [*args, "--home", str(tmp_path)])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, result.output

    assert cli("teams", "create", "--name", "t")[0] == 0
    assert cli("users", "create", "--name", "u", "--team", "t")[0] == 0
    assert cli("keys", "create", "--name", "ok", "--tokens-per-day", str(2**63 - 1))[0] == 0
    refused = [
        ("keys", "create", "--name", "a", "--rpm", str(2**63)),
        ("keys", "create", "--name", "a", "--tokens-per-day", str(2**63)),
        ("keys", "create", "--name", "a", "--tpm", str(2**31)),
        ("keys", "set-limits", "1", "--images-per-day", str(2**31)),
        ("users", "set-limits", "u", "--tokens-per-month", str(2**64)),
        ("users", "create", "--name", "v", "--rpm", str(2**63)),
        ("teams", "set-limits", "t", "--tpm", str(10**30)),
        ("teams", "create", "--name", "t2", "--images-per-month", str(2**40)),
    ]
    for args in refused:
        code, out = cli(*args)
        assert code == 2 and "error:" in out and "must be an integer from 1 to" in out, (args, out)
    for args in (("keys", "set-limits", str(2**70), "--rpm", "5"), ("keys", "revoke", str(2**70))):
        code, out = cli(*args)
        assert code == 1 and "error: no active key" in out, (args, out)
