"""API-key generation, hashing, storage and the first admin key."""

from __future__ import annotations

import asyncio
import re
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from starlette.datastructures import Headers

from budrt.config import Settings
from budrt.gateway.auth import Authenticator, extract_key
from budrt.gateway.main import prepare
from budrt.protocol.errors import APIError
from budrt.security.keys import generate_api_key, hash_api_key, load_or_create_secret, well_formed
from budrt.store.db import migrate
from budrt.store.keys import KeyStore


@pytest.fixture
def store(tmp_path: Path, database_url: str) -> KeyStore:
    settings = Settings(home=tmp_path, database_url=database_url)
    migrate(settings.database_url_resolved)
    ks = KeyStore.from_settings(settings)
    yield ks
    ks.db.dispose()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_keys() -> None:
    keys = {generate_api_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in list(keys)[:50]:
        assert re.fullmatch(r"budrt-[A-Za-z0-9_-]{43}", key)  # 32 random bytes, base64url
        assert well_formed(key)


def test_hash_depends_on_secret() -> None:
    key = generate_api_key()
    assert hash_api_key(key, b"a" * 32) == hash_api_key(key, b"a" * 32)
    assert hash_api_key(key, b"a" * 32) != hash_api_key(key, b"b" * 32)
    assert re.fullmatch(r"[0-9a-f]{64}", hash_api_key(key, b"a" * 32))


def test_verify(store: KeyStore) -> None:
    key, record = store.create("app", models=["m1"], rpm=10, tpm=1000)
    assert record.prefix == key[:12] and record.role == "user" and record.models == ("m1",)
    found = store.verify(key)
    assert found is not None and found.id == record.id and found.rpm == 10
    assert store.verify(key + "x") is None
    assert store.verify("") is None

    past, _ = store.create("old", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert store.verify(past) is None
    future, _ = store.create("new", expires_at=datetime.now(UTC) + timedelta(hours=1))
    assert store.verify(future) is not None

    assert store.revoke(record.prefix) is not None
    assert store.verify(key) is None
    assert store.revoke(record.id) is None  # already revoked
    with pytest.raises(ValueError):
        store.revoke("budrt-")  # matches several keys
    assert [r.name for r in store.list()] == ["app", "old", "new"]


def test_ensure_admin_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = "budrt-my-admin-key-0123456789"
    monkeypatch.setenv("BUDRT_ADMIN_KEY", chosen)
    settings = Settings(home=tmp_path)
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    assert not store.has_admin()
    # A chosen key the gateway would refuse unread (not shaped like a key) is refused here.
    with pytest.raises(ValueError, match="BUDRT_ADMIN_KEY"):
        store.ensure_admin(Settings(home=tmp_path, admin_key="my-admin-key-123"))
    assert not store.has_admin()
    assert store.ensure_admin(settings) == chosen
    assert store.has_admin()
    record = store.verify(chosen)
    assert record is not None and record.is_admin
    path = tmp_path / "admin.key"
    assert path.read_text().strip() == chosen and _mode(path) == 0o600
    assert store.ensure_admin(settings) is None
    store.db.dispose()


def test_ensure_admin_generated_and_printed_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(home=tmp_path)
    prepare(settings).db.dispose()
    out = capsys.readouterr().out
    match = re.fullmatch(r"admin key: (budrt-\S+) \(saved to (\S+)\)\n", out)
    assert match, out
    path = Path(match.group(2))
    assert path == tmp_path / "admin.key" and _mode(path) == 0o600
    assert path.read_text().strip() == match.group(1)
    store = prepare(settings)
    assert capsys.readouterr().out == ""
    record = store.verify(match.group(1))
    assert record is not None and record.is_admin
    store.db.dispose()


def test_secret_file(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_or_create_secret(settings))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results[0]) == 32
    path = tmp_path / "home" / "secret.key"
    assert _mode(path) == 0o600
    assert load_or_create_secret(settings) == results[0]
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temp files left
    assert load_or_create_secret(Settings(home=tmp_path, secret_key="given")) == b"given"


def test_extract_key() -> None:
    assert extract_key(Headers({"authorization": "Bearer abc"})) == "abc"
    assert extract_key(Headers({"authorization": "bearer  abc "})) == "abc"
    assert extract_key(Headers({"authorization": "Basic abc"})) is None
    assert extract_key(Headers({"api-key": "k1"})) == "k1"
    assert extract_key(Headers({"x-api-key": "k2"})) == "k2"
    assert extract_key(Headers({})) is None


def test_authenticator_caches(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key, _ = store.create("cached")
    calls: list[str] = []
    verify = store.verify_digest
    monkeypatch.setattr(store, "verify_digest", lambda d: calls.append(d) or verify(d))
    auth = Authenticator(store, ttl_s=60)
    headers = Headers({"authorization": f"Bearer {key}"})

    async def run() -> None:
        records = await asyncio.gather(*(auth.authenticate(headers) for _ in range(20)))
        assert {r.name for r in records} == {"cached"}
        with pytest.raises(APIError) as exc:
            await auth.authenticate(Headers({"authorization": f"Bearer {unknown}"}))
        assert exc.value.status == 401

    unknown = generate_api_key()
    asyncio.run(run())
    assert calls == [store.hash(key), store.hash(unknown)]  # concurrent misses share one DB read


def test_the_warm_up_reads_one_unknown_digest_and_never_fails(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At a gateway's start (its lifespan) `warm_up` looks up a digest no key has, so the first
    request finds the thread pool and the database connection ready; it writes and caches
    nothing, and a database that is down only makes it log."""
    key, record = store.create("kept")
    calls: list[str] = []
    verify = store.verify_digest
    monkeypatch.setattr(store, "verify_digest", lambda d: calls.append(d) or verify(d))
    auth = Authenticator(store, ttl_s=60)
    asyncio.run(auth.warm_up())
    assert calls == ["0" * 64] and not auth._cache
    assert store.get(record.id).last_used_at is None  # nothing written

    def down(digest: str) -> None:
        raise ConnectionError("database is down")

    monkeypatch.setattr(store, "verify_digest", down)
    with caplog.at_level("INFO", logger="budrt.gateway"):
        asyncio.run(auth.warm_up())
    assert "key lookup warm-up failed: database is down" in caplog.text


def _bearer(key: str) -> Headers:
    return Headers({"authorization": f"Bearer {key}"})


async def _refused(auth: Authenticator, key: str) -> None:
    with pytest.raises(APIError) as exc:
        await auth.authenticate(_bearer(key))
    assert exc.value.status == 401 and exc.value.code == "invalid_api_key"


def test_garbage_keys_cost_no_reads_and_evict_nothing(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sprayed keys: malformed ones are refused unread, unknown ones are read once and then
    remembered apart (bounded), and neither kind pushes a valid key out of the cache."""
    import budrt.gateway.auth as auth_module

    monkeypatch.setattr(auth_module, "_MAX_CACHED", 50)
    monkeypatch.setattr(auth_module, "_MAX_MISSES", 50)
    key, _ = store.create("valid")
    calls: list[str] = []
    verify = store.verify_digest
    monkeypatch.setattr(store, "verify_digest", lambda d: calls.append(d) or verify(d))
    auth = Authenticator(store, ttl_s=60)
    malformed = [
        "wrong",
        "",
        "budrt-",
        "budrt-short",
        "budrt-" + "a" * 129,
        "x" * 10_000,
        "budrt-" + "é" * 43,
    ]
    malformed += ["budrt-" + "a" * 42 + "!", "sk-" + "a" * 48, "eyJhbGciOiJIUzI1NiJ9.e30.sig"]
    unknown = [generate_api_key() for _ in range(200)]  # 4x the negative cache's bound

    async def run() -> None:
        assert (await auth.authenticate(_bearer(key))).name == "valid"
        for bad in malformed * 3:
            if bad:
                await _refused(auth, bad)
        assert calls == [store.hash(key)]  # not one read for a malformed key
        for bad in unknown:
            await _refused(auth, bad)
        assert calls == [store.hash(k) for k in (key, *unknown)]  # one read each...
        for bad in unknown[-50:]:
            await _refused(auth, bad)
        assert len(calls) == 1 + len(unknown)  # ...and none again while remembered
        assert len(auth._misses) == 50  # bounded: the least recently seen went first
        await _refused(auth, unknown[0])
        assert len(calls) == 2 + len(unknown)
        assert (await auth.authenticate(_bearer(key))).name == "valid"
        assert calls.count(store.hash(key)) == 1  # the valid key's entry survived all of it

    asyncio.run(run())


def test_positive_cache_is_bounded_without_flushing(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import budrt.gateway.auth as auth_module

    monkeypatch.setattr(auth_module, "_MAX_CACHED", 5)
    keys = [store.create(f"k{i}")[0] for i in range(8)]
    calls: list[str] = []
    verify = store.verify_digest
    monkeypatch.setattr(store, "verify_digest", lambda d: calls.append(d) or verify(d))
    auth = Authenticator(store, ttl_s=60)

    async def run() -> None:
        for k in keys:
            await auth.authenticate(_bearer(k))
        assert len(auth._cache) == 5
        for k in keys[-5:]:  # the five loaded last are all still cached: one entry went per insert
            await auth.authenticate(_bearer(k))
        assert calls == [store.hash(k) for k in keys]

    asyncio.run(run())
