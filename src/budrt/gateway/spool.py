"""An append-only spool of JSON lines on local disk, in segments, for usage records.

The meter appends each record to the active segment with one `write()` (O_APPEND), so a record
survives the gateway's death (even SIGKILL) from that instant; fsync happens in batches, when a
segment is sealed and before its records go to the database. A segment is deleted only once its
records are committed; segments left behind by a dead process are replayed at the next start.

Several gateways may share `$BUDRT_HOME`: each holds an `flock` on every segment it owns, and a
process replays only segments nobody holds.

With a key provider (`metering.encrypt_spool`, on by default) every line is sealed
(`security/sealed_lines.py`) under a data key made once per process; each segment starts with a
header line holding that key wrapped by the provider, bound to the process's boot id. A segment
whose key cannot be unwrapped (KMS down, version retired) raises, so it stays on disk for a retry.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import orjson

from budrt.security.envelope import IntegrityError
from budrt.security.kms import KeyProvider, KmsError, WrappedKey
from budrt.security.sealed_lines import LineSealer

log = logging.getLogger("budrt.gateway.metering")

SUFFIX = ".jsonl"
KEY_FIELD = "budrt-spool-key"  # the header line: {"budrt-spool-key": wrapped key metadata}


def _context(boot: str) -> dict[str, str]:
    return {"budrt-spool": boot}


def _boot_of(path: Path) -> str:
    return path.name.split("-", 1)[0]  # segments are named <boot>-<seq>.jsonl


class Segment:
    """One spool file, locked by this process while it is open."""

    def __init__(self, path: Path, fd: int, keys: KeyProvider | None = None) -> None:
        self.path = path
        self.fd = fd
        self.keys = keys  # to unwrap the key of a sealed segment when its records are read
        self.lines = 0  # appended by this process (replayed segments: unknown, 0)

    @classmethod
    def create(cls, path: Path, header: bytes = b"", keys: KeyProvider | None = None) -> Segment:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if header:
            os.write(fd, header)
        return cls(path, fd, keys)

    @classmethod
    def adopt(cls, path: Path, keys: KeyProvider | None = None) -> Segment | None:
        """A segment left by a dead process, now locked by this one; None if someone holds it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # its owner committed and removed it meanwhile
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not path.exists():  # removed between our open and our lock
            os.close(fd)
            return None
        return cls(path, fd, keys)

    def sync(self) -> None:
        os.fsync(self.fd)

    def records(self) -> Iterator[list[object]]:
        """The records in the file, read line by line (a segment can hold an outage's worth);
        a torn or garbled line (power loss) is skipped and logged. A sealed segment whose key
        cannot be unwrapped raises (KmsError, IntegrityError): nothing of it is lost."""
        with self.path.open("rb") as f:
            sealer: LineSealer | None = None
            for number, line in enumerate(f):
                if not line.strip():
                    continue
                if number == 0 and line.startswith(b'{"' + KEY_FIELD.encode()):
                    sealer = self._sealer(line)
                    continue
                record = self._parse(line, sealer)
                if isinstance(record, list):
                    yield record
                else:
                    log.warning(
                        "usage spool: skipped a damaged line", extra={"fields": {"file": self.path.name}}
                    )

    def _sealer(self, header: bytes) -> LineSealer:
        if self.keys is None:
            raise KmsError(f"{self.path.name} is encrypted and no key provider is configured")
        wrapped = WrappedKey.from_metadata(orjson.loads(header)[KEY_FIELD])
        return LineSealer(self.keys.unwrap(wrapped, _context(_boot_of(self.path))), self.path.name)

    @staticmethod
    def _parse(line: bytes, sealer: LineSealer | None) -> object:
        try:
            return orjson.loads(sealer.open(line) if sealer is not None else line)
        except (orjson.JSONDecodeError, IntegrityError):
            return None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)  # unlinked while still locked: nobody replays it twice
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also releases the lock
            self.fd = -1


class Spool:
    """The active segment this process appends to, plus segment naming and discovery."""

    def __init__(self, directory: Path, keys: KeyProvider | None = None) -> None:
        self.directory = directory
        self.keys = keys  # None: plain JSON lines
        self.boot = secrets.token_hex(8)  # names this process's segments and record ids
        self._seq = 0
        self.active: Segment | None = None
        self._sealer: LineSealer | None = None
        self._header = b""

    def open(self) -> list[Segment]:
        """Create the directory (0700) and the active segment; returns orphaned segments to replay."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        if self.keys is not None:  # one data key for this process's segments: one KMS call
            data_key, wrapped = self.keys.generate_data_key(_context(self.boot))
            self._header = orjson.dumps({KEY_FIELD: wrapped.to_metadata()}, option=orjson.OPT_APPEND_NEWLINE)
            self._sealer = LineSealer(data_key, "")
        orphans = []
        for path in sorted(self.directory.glob("*" + SUFFIX), key=lambda p: p.stat().st_mtime):
            segment = Segment.adopt(path, self.keys)
            if segment is not None:
                orphans.append(segment)
        self.active = self._new()
        return orphans

    def _new(self) -> Segment:
        self._seq += 1
        path = self.directory / f"{self.boot}-{self._seq:06d}{SUFFIX}"
        if self._sealer is not None:
            self._sealer = self._sealer.renamed(path.name)
        return Segment.create(path, self._header, self.keys)

    def append(self, line: bytes) -> None:
        """One write of one whole line (sealed when the spool is encrypted); OSError if the disk
        refuses it."""
        active = self.active
        assert active is not None, "Spool.open() first"
        os.write(active.fd, line if self._sealer is None else self._sealer.seal(line.rstrip(b"\n")))
        active.lines += 1

    @property
    def pending(self) -> int:
        return self.active.lines if self.active is not None else 0

    def seal(self) -> Segment | None:
        """Hand over the active segment (if it holds anything) and start a new one."""
        active = self.active
        if active is None or not active.lines:
            return None
        self.active = self._new()
        return active

    def close(self) -> None:
        """Drop the active segment if empty; otherwise leave it for the next start to replay."""
        active, self.active = self.active, None
        if active is None:
            return
        if active.lines:
            active.sync()
            active.close()
        else:
            active.remove()
