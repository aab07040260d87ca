"""The streaming envelope (security/envelope.py): round trips at every size that matters, and every
kind of tampering (a flipped byte, a cut, a dropped, repeated or reordered segment, appended
bytes, another object's name) failing with IntegrityError instead of returning data."""

from __future__ import annotations

import io
import os

import pytest

from budrt.security.envelope import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    DecryptingReader,
    IntegrityError,
    ciphertext_size,
    decrypt_bytes,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
    plaintext_size,
)

KEY = bytes(range(32))
AAD = b"images/x.png"
SEG = 64  # small segments: many of them in a few bytes
SEALED = SEG + TAG_SIZE


def _segments(blob: bytes) -> list[bytes]:
    body = blob[HEADER_SIZE:]
    return [body[i : i + SEALED] for i in range(0, len(body), SEALED)]


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 2 * SEG, 5 * SEG + 7])
def test_round_trip_sizes(size: int) -> None:
    plain = os.urandom(size)
    blob = encrypt_bytes(plain, KEY, AAD, SEG)
    assert len(blob) == ciphertext_size(size, SEG)
    assert plaintext_size(len(blob), SEG) == size
    assert decrypt_bytes(blob, KEY, AAD) == plain
    # A short plaintext can occur in random ciphertext by chance (one byte: ~15%).
    assert len(plain) < 8 or plain not in blob


def test_default_segment_size_and_streams() -> None:
    plain = os.urandom(3 * SEGMENT_SIZE + 123)
    sealed = io.BytesIO()
    written = encrypt_stream(io.BytesIO(plain), sealed, KEY, AAD)
    assert written == len(sealed.getvalue()) == ciphertext_size(len(plain))
    out = io.BytesIO()
    assert decrypt_stream(io.BytesIO(sealed.getvalue()), out, KEY, AAD) == len(plain)
    assert out.getvalue() == plain


def test_exactly_one_segment_is_one_segment() -> None:
    assert len(encrypt_bytes(b"x" * SEGMENT_SIZE, KEY, AAD)) == HEADER_SIZE + SEGMENT_SIZE + TAG_SIZE
    assert len(encrypt_bytes(b"", KEY, AAD)) == HEADER_SIZE + TAG_SIZE


@pytest.mark.parametrize("chunk", [1, 7, SEG - 1, SEG, SEG + 3, 1000])
def test_reader_with_odd_read_sizes(chunk: int) -> None:
    plain = os.urandom(7 * SEG + 5)
    reader = DecryptingReader(io.BytesIO(encrypt_bytes(plain, KEY, AAD, SEG)), KEY, AAD)
    got = bytearray()
    while part := reader.read(chunk):
        assert len(part) == chunk or len(got) + len(part) == len(plain)  # full reads until the end
        got += part
    assert bytes(got) == plain and reader.read(5) == b""
    reader.close()
    assert reader.closed
    with pytest.raises(ValueError):
        reader.read(1)


def test_reader_read_all_readinto_and_context_manager() -> None:
    plain = os.urandom(3 * SEG)
    source = io.BytesIO(encrypt_bytes(plain, KEY, AAD, SEG))
    with DecryptingReader(source, KEY, AAD) as reader:
        assert reader.read(10) == plain[:10]
        buffer = bytearray(20)
        assert reader.readinto(buffer) == 20 and bytes(buffer) == plain[10:30]
        assert reader.read() == plain[30:]
    assert source.closed  # the reader closes its source


def _fails(blob: bytes, aad: bytes = AAD, key: bytes = KEY) -> str:
    with pytest.raises(IntegrityError) as failure:
        decrypt_bytes(blob, key, aad)
    return str(failure.value)


def test_every_sampled_byte_flip_fails() -> None:
    blob = encrypt_bytes(os.urandom(4 * SEG + 9), KEY, AAD, SEG)
    positions = set(range(HEADER_SIZE + 2)) | set(range(len(blob) - TAG_SIZE - 2, len(blob)))
    positions |= set(range(HEADER_SIZE, len(blob), 13))  # inside every segment and tag
    for position in sorted(positions):
        for bit in (0x01, 0x80):
            tampered = bytearray(blob)
            tampered[position] ^= bit
            _fails(bytes(tampered))


def test_the_error_names_the_segment_and_the_object() -> None:
    blob = bytearray(encrypt_bytes(os.urandom(5 * SEG), KEY, AAD, SEG))
    blob[HEADER_SIZE + 2 * SEALED + 5] ^= 1  # inside the third segment
    assert _fails(bytes(blob)) == "segment 3 of images/x.png failed authentication"
    assert "bad magic" in _fails(b"NOTMAGIC" + bytes(blob[8:]))
    assert "truncated header" in _fails(bytes(blob[:10]))


def test_truncation_at_segment_boundaries_fails() -> None:
    blob = encrypt_bytes(os.urandom(4 * SEG + 9), KEY, AAD, SEG)
    for cut in (HEADER_SIZE, HEADER_SIZE + SEALED, HEADER_SIZE + 2 * SEALED, HEADER_SIZE + 4 * SEALED):
        _fails(blob[:cut])
    _fails(blob[:-1])
    exact = encrypt_bytes(os.urandom(3 * SEG), KEY, AAD, SEG)  # the last segment is a full one
    _fails(exact[: HEADER_SIZE + 2 * SEALED])


def test_dropped_repeated_reordered_and_appended_segments_fail() -> None:
    blob = encrypt_bytes(os.urandom(4 * SEG + 9), KEY, AAD, SEG)
    header, segments = blob[:HEADER_SIZE], _segments(blob)
    assert len(segments) == 5
    _fails(header + b"".join(segments[:1] + segments[2:]))  # one dropped
    _fails(header + b"".join(segments[:2] + segments[1:]))  # one repeated
    _fails(header + b"".join([segments[1], segments[0], *segments[2:]]))  # two swapped
    _fails(header + b"".join(segments[:-2] + [segments[-1], segments[-2]]))
    _fails(blob + b"x")
    _fails(blob + os.urandom(SEALED))
    _fails(blob + segments[-1])


def test_segments_do_not_move_between_envelopes() -> None:
    """Same key and name, another envelope: its segments carry another header (nonce prefix)."""
    first = encrypt_bytes(os.urandom(3 * SEG), KEY, AAD, SEG)
    second = encrypt_bytes(os.urandom(3 * SEG), KEY, AAD, SEG)
    mixed = first[:HEADER_SIZE] + b"".join([_segments(first)[0], _segments(second)[1], _segments(first)[2]])
    _fails(mixed)
    _fails(second[:HEADER_SIZE] + first[HEADER_SIZE:])  # another header over the same segments


def test_another_name_or_key_fails() -> None:
    blob = encrypt_bytes(b"hello", KEY, AAD, SEG)
    assert "segment 1 of images/y.png" in _fails(blob, aad=b"images/y.png")
    _fails(blob, key=os.urandom(32))
    # The reader refuses at once, on construction, before any read.
    with pytest.raises(IntegrityError):
        DecryptingReader(io.BytesIO(blob), KEY, b"images/y.png")


def test_a_failing_stream_returns_no_unauthenticated_byte() -> None:
    plain = os.urandom(3 * SEG)
    blob = bytearray(encrypt_bytes(plain, KEY, AAD, SEG))
    blob[HEADER_SIZE + SEALED + 1] ^= 1  # the second segment
    reader = DecryptingReader(io.BytesIO(bytes(blob)), KEY, AAD)
    assert reader.read(SEG) == plain[:SEG]  # the first, authentic segment
    with pytest.raises(IntegrityError, match="segment 2 of"):
        reader.read(1)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        encrypt_bytes(b"x", b"short", AAD)
    with pytest.raises(ValueError):
        encrypt_bytes(b"x", KEY, AAD, segment_size=8)
    for impossible in (0, HEADER_SIZE, HEADER_SIZE + TAG_SIZE - 1, HEADER_SIZE + SEALED + 3):
        with pytest.raises(ValueError):
            plaintext_size(impossible, SEG)
