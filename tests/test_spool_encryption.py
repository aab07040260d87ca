"""The usage spool sealed at rest (gateway/spool.py, security/sealed_lines.py): no record in the
clear on disk, replay after a crash, a changed or moved line skipped, a segment whose key cannot
be unwrapped kept for a retry, plain segments of an earlier run still replayed."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from budrt.gateway.spool import Spool
from budrt.security.envelope import IntegrityError
from budrt.security.kms import KmsError, LocalKeyring
from budrt.security.sealed_lines import LineSealer

RECORD = ["boot-1", 1.5, 7, "alice", "team-a", "secret-model-name", "chat", 4, 1, 2.0, 200, False, 0, 0, 0]


def _line(n: int) -> bytes:
    return orjson.dumps([f"id-{n}", *RECORD[1:]], option=orjson.OPT_APPEND_NEWLINE)


def _crash(spool: Spool) -> Path:
    """Leave the active segment as a killed gateway would: on disk, unlocked."""
    active = spool.active
    assert active is not None
    active.sync()
    active.close()
    return active.path


def test_records_are_sealed_on_disk_and_replayed_after_a_crash(tmp_path: Path) -> None:
    keys = LocalKeyring(tmp_path / "keyring.json")
    spool = Spool(tmp_path / "spool", keys)
    assert spool.open() == []
    for n in range(3):
        spool.append(_line(n))
    path = _crash(spool)
    raw = path.read_bytes()
    assert b"alice" not in raw and b"secret-model-name" not in raw and b"id-1" not in raw
    header, *lines = raw.splitlines()
    assert orjson.loads(header)["budrt-spool-key"]["provider"] == "local"
    assert len(lines) == 3
    later = Spool(tmp_path / "spool", LocalKeyring(tmp_path / "keyring.json"))  # the next start
    orphans = later.open()
    assert [r[0] for r in orphans[0].records()] == ["id-0", "id-1", "id-2"]


def test_a_changed_or_moved_line_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    keys = LocalKeyring(tmp_path / "keyring.json")
    first = Spool(tmp_path / "spool", keys)
    first.open()
    first.append(_line(0))
    first.append(_line(1))
    path = _crash(first)
    second = Spool(tmp_path / "spool", keys)
    for orphan in second.open():
        orphan.close()  # leave the first segment for the third start
    second.append(_line(9))
    other = _crash(second)
    header, zero, one = path.read_bytes().splitlines()
    flipped = bytearray(one)
    flipped[20] ^= 0x01
    moved = other.read_bytes().splitlines()[1]  # a line sealed for another segment
    path.write_bytes(b"\n".join([header, zero, bytes(flipped), moved]) + b"\n")
    third = Spool(tmp_path / "spool", keys)
    replayed = {seg.path.name: [r[0] for r in seg.records()] for seg in third.open()}
    assert replayed[path.name] == ["id-0"]
    assert replayed[other.name] == ["id-9"]


def test_a_segment_whose_key_cannot_be_unwrapped_raises_and_stays(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", LocalKeyring(tmp_path / "keyring.json"))
    spool.open()
    spool.append(_line(0))
    path = _crash(spool)
    stranger = Spool(tmp_path / "spool", LocalKeyring(tmp_path / "other-keyring.json"))
    (segment,) = stranger.open()
    with pytest.raises((KmsError, IntegrityError)):
        list(segment.records())
    assert path.exists()
    segment.close()
    unkeyed = Spool(tmp_path / "spool")  # encryption switched off: still refuses to guess
    (segment,) = unkeyed.open()
    with pytest.raises(KmsError, match="no key provider"):
        list(segment.records())


def test_plain_segments_of_an_earlier_run_replay_under_encryption(tmp_path: Path) -> None:
    plain = Spool(tmp_path / "spool")
    plain.open()
    plain.append(_line(5))
    _crash(plain)
    sealed = Spool(tmp_path / "spool", LocalKeyring(tmp_path / "keyring.json"))
    (segment,) = sealed.open()
    assert [r[0] for r in segment.records()] == ["id-5"]


def test_line_sealer_refuses_garbage() -> None:
    sealer = LineSealer(b"k" * 32, "a.jsonl")
    assert sealer.open(sealer.seal(b"[1]")) == b"[1]"
    for bad in (b"not base64!", b"AAAA", sealer.renamed("b.jsonl").seal(b"[1]")):
        with pytest.raises(IntegrityError):
            sealer.open(bad)
