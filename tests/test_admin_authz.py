"""Every admin route against every kind of caller: the exact allow/deny matrix over real HTTP.

Callers: an admin key, a developer key, a viewer key, a team lead's key and no key at all. The
team lead's key belongs to team `research` and has the custom role `research-lead` (below):
it reads its own and its team's usage, manages the keys of its team (create, list, revoke),
lists and updates its team's members, and may hand out the `developer` role, nothing more. It
may not create users, teams or roles, raise its team's limits, read the audit log or touch
replicas, and it reaches nothing of team `ops`.

Every call that must be refused is checked to have changed nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.gateway.identity import CHAT, Gateway, chat, settings, start
from tests.mock_upstream import MockUpstream, ServerThread

CALLERS = ("admin", "dev", "viewer", "team", "none")
RESEARCH_LEAD = [
    "usage:read:own",
    "usage:read:team",
    "keys:create@team:research",
    "keys:list@team:research",
    "keys:revoke@team:research",
    "users:list@team:research",
    "users:update@team:research",
    "roles:assign@role:developer",
    "models:list@model:*",
]


@dataclass
class World:
    g: Gateway
    upstream: str
    keys: dict[str, str]  # caller -> plaintext key ("none": no key)
    victims: dict[str, dict[str, Any]]  # what each caller's dangerous calls aim at

    def call(self, who: str, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {} if who == "none" else {"Authorization": f"Bearer {self.keys[who]}"}
        with httpx.Client(base_url=self.g.url, headers=headers, timeout=10) as c:
            return c.request(method, path, json=body)

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.call("admin", method, path, body)
        assert resp.status_code < 300, resp.text
        return resp.json()


def _key(w: World, body: dict[str, Any]) -> dict[str, Any]:
    return w.admin("POST", "/admin/keys", body)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    upstream = ServerThread(MockUpstream("up").app).start()
    g = start(settings(tmp_path_factory.mktemp("authz"), upstream.url + "/v1", ["m1"]))
    w = World(g, upstream.url, {"admin": g.store.create("admin", role="admin")[0]}, {})
    w.admin("POST", "/admin/teams", {"name": "research"})
    w.admin("POST", "/admin/teams", {"name": "ops"})
    w.admin("POST", "/admin/roles", {"name": "research-lead", "permissions": RESEARCH_LEAD})
    w.admin("POST", "/admin/users", {"name": "rita", "team": "research", "roles": ["developer"]})
    w.admin("POST", "/admin/users", {"name": "otto", "team": "ops", "roles": ["developer"]})
    w.keys["dev"] = _key(w, {"name": "dev", "role": "developer"})["key"]
    w.keys["viewer"] = _key(w, {"name": "viewer", "role": "viewer"})["key"]
    w.keys["team"] = _key(w, {"name": "lead", "role": "research-lead", "team": "research"})["key"]
    for who in CALLERS:
        v: dict[str, Any] = {
            "research_key": _key(w, {"name": f"r-{who}", "team": "research"})["id"],
            "ops_key": _key(w, {"name": f"o-{who}", "team": "ops"})["id"],
            "admin_key": _key(w, {"name": f"a-{who}", "role": "admin"})["id"],
            "limits_key": _key(w, {"name": f"l-{who}", "team": "ops"})["id"],
            "member": f"mem-{who}",
            "boss": f"boss-{who}",
            "replica": f"{upstream.url}/victim-{who}/v1",
        }
        w.admin("POST", "/admin/users", {"name": v["member"], "team": "research", "roles": ["developer"]})
        w.admin("POST", "/admin/users", {"name": v["boss"], "team": "research", "roles": ["admin"]})
        w.admin(
            "POST", "/admin/replicas/heartbeat", {"url": v["replica"], "models": [f"v-{who}"], "ttl_s": 3600}
        )
        w.victims[who] = v
    with g.client(w.keys["team"]) as c:  # some usage of the team's, to read back
        c.post(CHAT, json=chat("m1"))
    yield w
    g.stop()
    upstream.stop()


Body = Callable[[str, dict[str, Any]], Any]


# Statuses for admin, dev, viewer, team, none.
EVERYONE = (200, 200, 200, 200, 401)
ADMIN = (200, 403, 403, 403, 401)
ADMIN_MADE = (201, 403, 403, 403, 401)
ADMIN_TEAM = (200, 403, 403, 200, 401)
ADMIN_TEAM_MADE = (201, 403, 403, 201, 401)
ADMIN_MISSING = (404, 403, 403, 403, 401)


def _per_caller(field: str, base: int) -> Body:
    """A value that differs by caller, so the state afterwards tells who changed it."""
    return lambda who, v: {field: base + CALLERS.index(who)}


def _named(prefix: str, **extra: Any) -> Body:
    return lambda who, v: {"name": f"{prefix}-{who}", **extra}


# (label, method, path formatted with the caller's victims, body, statuses).
ROUTES: list[tuple[str, str, str, Body | None, tuple[int, int, int, int, int]]] = [
    ("own usage", "GET", "/v1/usage", None, EVERYONE),
    ("usage report", "GET", "/admin/usage", None, ADMIN_TEAM),
    ("usage of own team", "GET", "/admin/usage?team=research&group_by=key", None, ADMIN_TEAM),
    ("usage of another team", "GET", "/admin/usage?team=ops", None, ADMIN),
    ("create team key", "POST", "/admin/keys", _named("k", team="research"), ADMIN_TEAM_MADE),
    ("create ownerless key", "POST", "/admin/keys", _named("k"), ADMIN_MADE),
    ("create other team's key", "POST", "/admin/keys", _named("k", team="ops"), ADMIN_MADE),
    ("create admin key", "POST", "/admin/keys", _named("k", team="research", role="admin"), ADMIN_MADE),
    ("create member's key", "POST", "/admin/keys", _named("k", user="rita"), ADMIN_TEAM_MADE),
    ("create other's key", "POST", "/admin/keys", _named("k", user="otto"), ADMIN_MADE),
    (
        "key beyond its creator",
        "POST",
        "/admin/keys",
        _named("k", team="research", permissions=["inference:chat@model:*"]),
        ADMIN_MADE,
    ),
    (
        "key within its creator",
        "POST",
        "/admin/keys",
        _named("k", team="research", permissions=["usage:read:team"]),
        ADMIN_TEAM_MADE,
    ),
    ("list keys", "GET", "/admin/keys", None, ADMIN_TEAM),
    ("revoke team key", "DELETE", "/admin/keys/{research_key}", None, ADMIN_TEAM),
    ("revoke other team's key", "DELETE", "/admin/keys/{ops_key}", None, ADMIN),
    ("revoke an admin key", "DELETE", "/admin/keys/{admin_key}", None, ADMIN),
    ("revoke missing key", "DELETE", "/admin/keys/999999", None, ADMIN_MISSING),
    ("key limits", "PATCH", "/admin/keys/{limits_key}", _per_caller("rpm", 5), ADMIN),
    ("revoked key limits", "PATCH", "/admin/keys/{ops_key}", _per_caller("rpm", 5), ADMIN_MISSING),
    ("create user", "POST", "/admin/users", _named("u"), ADMIN_MADE),
    ("create user in team", "POST", "/admin/users", _named("u2", team="research"), ADMIN_MADE),
    ("list users", "GET", "/admin/users", None, ADMIN_TEAM),
    ("strip a boss's roles", "PUT", "/admin/users/{boss}/roles", lambda w, v: {"roles": []}, ADMIN),
    ("member to admin", "PUT", "/admin/users/{member}/roles", lambda w, v: {"roles": ["admin"]}, ADMIN),
    ("member to viewer", "PUT", "/admin/users/{member}/roles", lambda w, v: {"roles": ["viewer"]}, ADMIN),
    ("strip a member", "PUT", "/admin/users/{member}/roles", lambda w, v: {"roles": []}, ADMIN_TEAM),
    ("other team's member", "PUT", "/admin/users/otto/roles", lambda w, v: {"roles": ["viewer"]}, ADMIN),
    ("member limits", "PATCH", "/admin/users/{member}", lambda w, v: {"rpm": 50}, ADMIN_TEAM),
    ("other member's limits", "PATCH", "/admin/users/otto", _per_caller("rpm", 50), ADMIN),
    ("create team", "POST", "/admin/teams", _named("t"), ADMIN_MADE),
    ("list teams", "GET", "/admin/teams", None, ADMIN),
    ("raise own team's limits", "PATCH", "/admin/teams/research", _per_caller("rpm", 1000), ADMIN),
    ("create role", "POST", "/admin/roles", _named("role", permissions=["models:list"]), ADMIN_MADE),
    ("list roles", "GET", "/admin/roles", None, ADMIN),
    ("audit log", "GET", "/admin/audit", None, ADMIN),
    (
        "register replica",
        "POST",
        "/admin/replicas/heartbeat",
        lambda w, v: {"url": f"http://127.0.0.1:9/{w}/v1", "models": [f"new-{w}"]},
        ADMIN,
    ),
    (
        "leave unknown replica",
        "POST",
        "/admin/replicas/heartbeat",
        lambda w, v: {"url": "http://127.0.0.1:9/gone/v1", "leaving": True},
        ADMIN,
    ),
    ("list replicas", "GET", "/admin/replicas", None, ADMIN),
    ("deregister replica", "DELETE", "/admin/replicas?url={replica}", None, ADMIN),
    ("deregister unknown", "DELETE", "/admin/replicas?url=http://127.0.0.1:9/none/v1", None, ADMIN_MISSING),
]


def test_admin_route_matrix(world: World) -> None:
    w = world
    got: dict[str, tuple[int, ...]] = {}
    for label, method, path, body, _ in ROUTES:
        row = []
        for who in CALLERS:
            v = w.victims[who]
            resp = w.call(who, method, path.format(**v), body(who, v) if body else None)
            if resp.status_code >= 400:  # every refusal in the OpenAI error shape
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}, resp.text
            row.append(resp.status_code)
        got[label] = tuple(row)
    assert got == {label: expected for label, _, _, _, expected in ROUTES}


def test_refused_calls_changed_nothing(world: World) -> None:
    """Run after the matrix (pytest keeps file order): the refused callers' targets are intact."""
    w = world
    keys = {k["id"]: k for k in w.admin("GET", "/admin/keys")["data"]}
    users = {u["name"]: u for u in w.admin("GET", "/admin/users")["data"]}
    teams = {t["name"]: t for t in w.admin("GET", "/admin/teams")["data"]}
    roles = {r["name"] for r in w.admin("GET", "/admin/roles")["data"]}
    replicas = {r["url"] for r in w.admin("GET", "/admin/replicas")["data"]}
    for who in ("dev", "viewer", "none"):
        v = w.victims[who]
        assert keys[v["research_key"]]["revoked_at"] is None
        assert users[v["member"]]["roles"] == ["developer"] and users[v["member"]]["rpm"] is None
        assert f"u-{who}" not in users and f"t-{who}" not in teams and f"role-{who}" not in roles
    for who in ("dev", "viewer", "team", "none"):
        v = w.victims[who]
        assert keys[v["ops_key"]]["revoked_at"] is None and keys[v["ops_key"]]["rpm"] is None
        assert keys[v["admin_key"]]["revoked_at"] is None
        assert keys[v["limits_key"]]["rpm"] is None
        assert users[v["boss"]]["roles"] == ["admin"]  # `{"roles": []}` stripped nothing
        assert v["replica"] in replicas
        assert f"http://127.0.0.1:9/{who}/v1" not in replicas
    # Values only the admin's call (the first of each row) would have written.
    assert users["otto"]["roles"] == ["viewer"] and users["otto"]["rpm"] == 50
    assert teams["research"]["rpm"] == 1000
    # What the team lead was allowed to do, it did.
    assert keys[w.victims["team"]["research_key"]]["revoked_at"] is not None
    assert users["mem-team"]["roles"] == [] and users["mem-team"]["rpm"] == 50
    # The admin's own calls went through.
    assert users["boss-admin"]["roles"] == [] and w.victims["admin"]["replica"] not in replicas
    actors = {e["actor"] for e in w.admin("GET", "/admin/audit?limit=1000")["data"]}
    # Filtered on the server: a text each named column contains (literally: `%` and `_` too).
    revokes = w.admin("GET", "/admin/audit?action=KEYS:REV&limit=1000")["data"]
    assert revokes and {e["action"] for e in revokes} == {"keys:revoke"}
    research = w.admin("GET", "/admin/audit?target=research&limit=1000")["data"]
    assert research and all("research" in e["target"] for e in research)
    assert w.admin("GET", "/admin/audit?target=%25")["data"] == []  # no target holds a literal %
    assert w.admin("GET", "/admin/audit?start=2999-01-01")["data"] == []
    dev_viewer = {f"key:{k['id']}" for k in keys.values() if k["name"] in ("dev", "viewer")}
    assert not actors & dev_viewer  # nothing they tried was written


def test_team_lead_sees_only_its_team(world: World) -> None:
    w = world
    listed = w.call("team", "GET", "/admin/keys").json()["data"]
    research = w.admin("GET", "/admin/teams")["data"]
    research_id = next(t["id"] for t in research if t["name"] == "research")
    assert listed and {k["team_id"] for k in listed} == {research_id}
    names = {u["name"] for u in w.call("team", "GET", "/admin/users").json()["data"]}
    assert "rita" in names and "otto" not in names
    assert all(u["team"] == "research" for u in w.call("team", "GET", "/admin/users").json()["data"])
    report = w.call("team", "GET", "/admin/usage?group_by=team").json()
    assert [row["team"] for row in report["data"]] == ["research"]
    # A key it creates for a member of its team belongs to that team; another team is refused.
    made = w.call("team", "POST", "/admin/keys", {"name": "for-rita", "user": "rita", "team": "research"})
    assert made.status_code == 201 and made.json()["team_id"] == research_id
    mismatch = w.call("admin", "POST", "/admin/keys", {"name": "x", "user": "rita", "team": "ops"})
    assert mismatch.status_code == 400 and mismatch.json()["error"]["param"] == "team"
    assert (
        w.call("team", "POST", "/admin/keys", {"name": "x", "user": "rita", "team": "ops"}).status_code == 403
    )
    # A user it may not see: the same 403 whether or not the user exists.
    for user in ("otto", "nobody-at-all"):
        assert w.call("team", "POST", "/admin/keys", {"name": "x", "user": user}).status_code == 403
    assert w.call("admin", "POST", "/admin/keys", {"name": "x", "user": "nobody-at-all"}).status_code == 404


def test_keys_hand_on_no_more_than_their_holder(world: World) -> None:
    w = world
    w.admin("POST", "/admin/roles", {"name": "minter", "permissions": [
        "keys:create", "roles:assign@role:*", "roles:create@role:*", "inference:chat@model:m?",
        "models:list@model:*",
    ]})  # fmt: skip
    soon = datetime.now(UTC) + timedelta(hours=1)
    minter = _key(w, {"name": "minter", "role": "minter", "models": ["m1"], "expires_in_s": 3600})["key"]
    with httpx.Client(base_url=w.g.url, headers={"Authorization": f"Bearer {minter}"}) as c:

        def status(path: str, body: dict[str, Any]) -> int:
            return c.post(path, json=body).status_code

        # `m?` holds `m1` and `m[0-9]`... but not `m*` (the literal "m*" matches "m?": unsound).
        assert status("/admin/keys", {"name": "a", "permissions": ["inference:chat@model:m1"]}) == 201
        assert status("/admin/keys", {"name": "a", "permissions": ["inference:chat@model:m*"]}) == 403
        assert status("/admin/keys", {"name": "a", "permissions": ["inference:chat@model:*"]}) == 403
        assert status("/admin/keys", {"name": "a", "permissions": ["inference:*@model:m1"]}) == 403
        assert status("/admin/roles", {"name": "r-ok", "permissions": ["inference:chat@model:m[12]"]}) == 201
        assert status("/admin/roles", {"name": "r-ok2", "permissions": ["inference:chat@model:m?"]}) == 201
        assert status("/admin/roles", {"name": "r-no", "permissions": ["inference:chat@model:m*"]}) == 403
        assert status("/admin/roles", {"name": "r-no2", "permissions": ["keys:*"]}) == 403
        denied = c.post("/admin/roles", json={"name": "r-no3", "permissions": ["*@*"]}).json()["error"]
        assert denied["param"] == "permissions" and denied["code"] == "permission_denied"
        # Models: within its own list, and by default that list; expiry: never after its own.
        assert status("/admin/keys", {"name": "a", "models": ["m2"]}) == 403
        made = c.post("/admin/keys", json={"name": "a", "expires_in_s": 10**6}).json()
        assert made["models"] == ["m1"]
        assert datetime.fromisoformat(made["expires_at"]) <= soon + timedelta(seconds=5)
    roles = {r["name"] for r in w.admin("GET", "/admin/roles")["data"]}
    assert {"r-ok", "r-ok2"} <= roles and not {"r-no", "r-no2", "r-no3"} & roles
    # Creating a key owned by a user still needs the right to assign its role.
    w.admin("POST", "/admin/roles", {"name": "keys-only", "permissions": ["keys:create"]})
    keys_only = _key(w, {"name": "ko", "role": "keys-only"})["key"]
    with httpx.Client(base_url=w.g.url, headers={"Authorization": f"Bearer {keys_only}"}) as c:
        assert c.post("/admin/keys", json={"name": "x", "user": "rita"}).status_code == 403
        assert c.post("/admin/keys", json={"name": "x", "user": "rita", "role": "admin"}).status_code == 403


def test_set_roles_checks_removed_roles(world: World) -> None:
    """The critical hole: `{"roles": []}` from any key stripped every user's roles."""
    w = world
    w.admin("POST", "/admin/users", {"name": "big-boss", "roles": ["admin"]})
    for who in ("dev", "viewer", "team"):
        resp = w.call(who, "PUT", "/admin/users/big-boss/roles", {"roles": []})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "permission_denied"
    users = {u["name"]: u for u in w.admin("GET", "/admin/users")["data"]}
    assert users["big-boss"]["roles"] == ["admin"]
    # A role it may assign, but also one it would take away that it may not: refused whole.
    w.admin("POST", "/admin/users", {"name": "mixed", "team": "research", "roles": ["admin", "developer"]})
    assert w.call("team", "PUT", "/admin/users/mixed/roles", {"roles": ["developer"]}).status_code == 403
    assert (
        w.call("team", "PUT", "/admin/users/mixed/roles", {"roles": ["admin", "developer"]}).status_code
        == 403
    )
    assert {u["name"]: u for u in w.admin("GET", "/admin/users")["data"]}["mixed"]["roles"] == [
        "admin",
        "developer",
    ]


BIG = 2**63
BAD_PARAMS: list[tuple[str, str, Any, str | None]] = [  # method, path, body, the param named
    *(("GET", f"{path}?{q}", None, q.partition("=")[0]) for path in ("/v1/usage", "/admin/usage") for q in (
        "start=inf", "start=-inf", "start=nan", "end=1e400", "start=1e300", "start=99999-01-01",
        "end=9999-12-31T23:59:59-14:00", "start=" + "9" * 5000,
    )),
    ("POST", "/admin/keys", {"name": "k", "expires_in_s": 10**18}, "expires_in_s"),
    ("POST", "/admin/keys", {"name": "k", "expires_in_s": 1e18}, "expires_in_s"),
    ("POST", "/admin/keys", {"name": "k", "expires_in_s": 2**64}, "expires_in_s"),
    ("POST", "/admin/keys", {"name": "k", "rpm": BIG}, "rpm"),
    ("POST", "/admin/keys", {"name": "k", "tpm": 2**31}, "tpm"),  # an Integer column
    ("POST", "/admin/keys", {"name": "k", "tokens_per_day": BIG}, "tokens_per_day"),
    ("POST", "/admin/keys", {"name": "k", "images_per_month": 2**31}, "images_per_month"),
    ("POST", "/admin/keys", {"name": "k", "rpm": 1.5}, "rpm"),
    ("POST", "/admin/keys", {"name": "k", "role": "r" * 65}, "role"),
    ("POST", "/admin/keys", {"name": "k", "models": ["m"] * 2000}, "models"),
    ("POST", "/admin/keys", {"name": "k", "permissions": ["a@" + "b" * 600]}, "permissions"),
    ("POST", "/admin/keys", {"name": "k", "permissions": ["a b"]}, "permissions"),
    ("POST", "/admin/keys", {"name": "a\u0000b"}, "name"),
    ("POST", "/admin/keys", {"name": "x" * 201}, "name"),
    ("POST", "/admin/users", {"name": "u", "rpm": BIG}, "rpm"),
    ("POST", "/admin/users", {"name": "u", "tokens_per_month": 2**70}, "tokens_per_month"),
    ("POST", "/admin/users", {"name": "line\nbreak"}, "name"),
    ("POST", "/admin/users", {"name": "u", "roles": "admin"}, "roles"),
    ("POST", "/admin/teams", {"name": "t", "tpm": BIG}, "tpm"),
    ("PATCH", "/admin/teams/research", {"tokens_per_day": BIG}, "tokens_per_day"),
    ("PATCH", "/admin/users/rita", {"rpm": BIG}, "rpm"),
    ("PATCH", "/admin/users/rita", {"bogus": 1}, "bogus"),
    ("PATCH", "/admin/keys/1", {"tpm": BIG}, "tpm"),
    ("PUT", "/admin/users/rita/roles", {"roles": [1]}, "roles"),
    ("POST", "/admin/roles", {"name": "Bad Name", "permissions": []}, "name"),
    ("GET", "/admin/audit?limit=%C2%B2", None, "limit"),  # "²".isdigit(), but int("²") fails
    ("GET", "/admin/audit?limit=-1", None, "limit"),
    ("GET", "/admin/audit?actor=a%00b", None, "actor"),
    ("GET", "/admin/audit?target=" + "x" * 201, None, "target"),
    ("GET", "/admin/audit?start=yesterday", None, "start"),
    ("GET", "/admin/usage?user=a%00b", None, "user"),
    ("GET", "/admin/usage?group_by=%00", None, "group_by"),
]  # fmt: skip


def test_bad_admin_params_are_400_naming_the_param(world: World) -> None:
    for method, path, body, param in BAD_PARAMS:
        resp = world.call("admin", method, path, body)
        assert resp.status_code == 400, (
            method,
            path[:80],
            body if body is None else str(body)[:80],
            resp.text,
        )
        assert resp.json()["error"]["param"] == param, (path[:80], resp.text)


def test_odd_admin_input_never_500(world: World) -> None:
    w = world
    raw = {"Authorization": f"Bearer {w.keys['admin']}"}
    with httpx.Client(base_url=w.g.url, headers=raw, timeout=10) as c:
        for path in ("/admin/keys/99999999999999999999", "/admin/keys/" + "9" * 5000, "/admin/keys/abc"):
            assert c.delete(path).status_code == 404, path[:40]
            assert c.patch(path, json={"rpm": 1}).status_code == 404, path[:40]
        for path in ("/admin/users/a%00b", "/admin/users/" + "u" * 300, "/admin/teams/a%01b"):
            assert c.patch(path, json={"rpm": 1}).status_code == 404, path[:40]
        assert c.put("/admin/users/a%00b/roles", json={"roles": []}).status_code == 404
        assert c.post("/admin/keys", content=b"\xff\xfe").status_code == 400
        assert c.post("/admin/keys", content=b"[1]").status_code == 400
        assert c.post("/admin/users", content=b'{"name": "\\ud800"}').status_code == 400
        # Large but legal values are kept as given.
        assert c.get("/admin/audit", params={"limit": "9" * 5000}).status_code == 200
        assert c.get("/admin/audit", params={"limit": "0"}).status_code == 200
        made = c.post("/admin/keys", json={"name": "max", "tokens_per_day": BIG - 1, "rpm": 2**31 - 1})
        assert made.status_code == 201 and made.json()["tokens_per_day"] == BIG - 1
        assert c.post("/admin/users", json={"name": "zoë-ünïcode-名前"}).status_code == 201
        old = c.get("/v1/usage", params={"start": "0001-01-01T00:00:00", "end": "9999-12-31"})
        assert old.status_code == 200
