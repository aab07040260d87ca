"""Signed, expiring URLs (security/signed_urls.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from budrt.config import Settings
from budrt.security.keys import hash_api_key, load_or_create_secret
from budrt.security.signed_urls import SIGNATURE, derive_key, sign, url_key, verify

KEY = derive_key(b"test-secret-test-secret")
PATH = "/v1/images/files/AbCdEfGh12345678_-abcd.png"
NOW = 1_800_000_000


def test_a_valid_signature_until_it_expires() -> None:
    sig = sign(PATH, NOW + 60, KEY)
    assert SIGNATURE.fullmatch(sig) and "=" not in sig  # url-safe base64, no padding
    assert sign(PATH, NOW + 60, KEY) == sig  # deterministic
    assert verify(PATH, NOW + 60, sig, KEY, now=NOW)
    assert verify(PATH, NOW + 60, sig, KEY, now=NOW + 59.9)
    assert not verify(PATH, NOW + 60, sig, KEY, now=NOW + 60)  # expired at `expires`
    assert not verify(PATH, NOW + 60, sig, KEY, now=NOW + 3600)


def test_tampered_or_foreign_signatures_fail() -> None:
    sig = sign(PATH, NOW + 60, KEY)
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    assert not verify(PATH, NOW + 60, flipped, KEY, now=NOW)
    assert not verify(PATH, NOW + 61, sig, KEY, now=NOW)  # a later expiry
    assert not verify(PATH.replace("AbCd", "ZbCd"), NOW + 60, sig, KEY, now=NOW)  # another id
    assert not verify(PATH.replace(".png", ".jpeg"), NOW + 60, sig, KEY, now=NOW)  # another extension
    assert not verify(PATH, NOW + 60, sig, derive_key(b"another-secret-another-secret"), now=NOW)


@pytest.mark.parametrize("bad", ["", "abc", "é" * 43, "=" * 43, " " * 43, "A" * 44, "A" * 42 + "="])
def test_malformed_signatures_fail_quietly(bad: str) -> None:
    assert not verify(PATH, NOW + 60, bad, KEY, now=NOW)


def test_the_url_key_is_derived_not_the_api_key_secret(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, secret_key="test-secret-test-secret")
    secret = load_or_create_secret(settings)
    key = url_key(settings)
    assert key == derive_key(secret) and key != secret and len(key) == 32
    assert sign("budrt-x", 0, key) != sign("budrt-x", 0, secret)
    for label in ("budrt signed-url key v1", "budrt-signed-urls"):  # not an API key's hash either
        assert key.hex() != hash_api_key(label, secret)
    # The file secret: the same key on every call (every gateway sharing $BUDRT_HOME).
    from_file = Settings(home=tmp_path / "home")
    assert url_key(from_file) == url_key(from_file) == derive_key((tmp_path / "home/secret.key").read_bytes())
