"""Usage metering: one record per request, spooled to disk at once, written to the DB in batches.

Nothing is lost and nothing counted twice:
- Before the client gets the last byte of its response, the request path appends the record
  (with a unique id) as one line to the spool (`gateway/spool.py`, `$BUDRT_HOME/run/usage-spool`):
  one small `write()`, no await; from then on it survives even a SIGKILL of the gateway.
- A background task seals the active segment every `flush_interval_s` (or at `batch_size`
  records), fsyncs it, inserts its records in batches in a worker thread and deletes it only
  after they are committed. A failed insert keeps the segment and retries later (backoff).
- At start, segments left behind by a dead gateway are replayed the same way. The insert skips
  ids already in the table, so a segment committed but not yet deleted at a crash counts once.
If the disk refuses a record, it waits in memory (up to `max_queue`, then it is dropped and
counted in `budrt_gateway_usage_dropped_total`) and is spooled again at the next flush.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from budrt.config import MeteringConfig
from budrt.gateway.spool import Segment, Spool
from budrt.gateway.stream import Buffered, UpstreamStream
from budrt.gateway.usage import STREAM_TAIL_BYTES, find_usage
from budrt.security.kms import KeyProvider
from budrt.security.rbac import Principal
from budrt.store.objects import ObjectStore
from budrt.store.usage import Usage, UsageStore

log = logging.getLogger("budrt.gateway.metering")

DROPPED = Counter("budrt_gateway_usage_dropped_total", "Usage records dropped (could not be spooled)")
WRITTEN = Counter("budrt_gateway_usage_written_total", "Usage records written to the database")
FAILED = Counter("budrt_gateway_usage_write_failures_total", "Failed usage inserts (retried)")

# One record, as spooled: [id, unix time, key id, user, team, model, endpoint, prompt tokens,
# completion tokens, latency ms, status, cache hit, images, pixels, steps, ttft ms]. A flat JSON
# array: cheap to write and read. Records of an older gateway end after "cache hit" (their
# images: 0) or after "steps" (no ttft).
Record = list[Any]
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1  # what the usage columns hold (tables.py)

# Where the request handler leaves what the meter needs (request.scope keys).
PRINCIPAL = "budrt.principal"
MODEL = "budrt.model"
MAX_BACKOFF_S = 30.0
ARCHIVE_PREFIX = "usage-archive/"


def spool_dir(home: Path) -> Path:
    return home / "run" / "usage-spool"


def archive_key(segment: Path) -> str:
    """usage-archive/<UTC date of the segment's last write>/<segment name>: the same for every
    attempt (a sealed segment no longer changes), unique per gateway process (the boot id)."""
    written = datetime.fromtimestamp(segment.stat().st_mtime, UTC)
    return f"{ARCHIVE_PREFIX}{written:%Y-%m-%d}/{segment.name}"


class Meter:
    def __init__(
        self,
        store: UsageStore,
        config: MeteringConfig,
        spool: Path,
        keys: KeyProvider | None = None,
        archive: ObjectStore | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.spool = Spool(spool, keys)
        self.archive = archive  # with `metering.archive`: where committed segments are kept
        self._ids = itertools.count(1)
        self._unspooled: list[Record] = []  # the disk refused them; spooled again at the next flush
        self._sealed: list[Segment] = []  # spooled, waiting for the DB (oldest first)
        self._failures = 0  # consecutive failed inserts: the flush loop backs off
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()  # segments reach the DB in order, one at a time

    def add(
        self,
        principal: Principal,
        model: str | None,
        endpoint: str,
        usage: Any,
        latency_ms: float,
        status: int,
        cache_hit: bool,
        ttft_ms: float | None = None,
    ) -> None:
        """Spool one request's record (the request path: one write, nothing awaited)."""
        if usage is not None and not isinstance(usage, dict):
            usage = find_usage(usage)
        prompt, completion = _tokens(usage)
        images, pixels, steps = _images(usage)
        record = [
            f"{self.spool.boot}-{next(self._ids):x}",
            time.time(),
            principal.key_id,
            principal.user,
            principal.team,
            model,
            endpoint,
            prompt,
            completion,
            round(latency_ms, 3),
            status,
            cache_hit,
            images,
            pixels,
            steps,
            None if ttft_ms is None else round(ttft_ms, 3),
        ]
        self._spool(record)
        if self.spool.pending >= self.config.batch_size:
            self._wake.set()

    def _spool(self, record: Record) -> None:
        try:
            self.spool.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        except OSError as exc:  # disk full or gone: keep it in memory, bounded
            if len(self._unspooled) >= self.config.max_queue:
                DROPPED.inc()
                return
            if not self._unspooled:
                log.error("usage spool write failed", extra={"fields": {"error": repr(exc)}})
            self._unspooled.append(record)

    async def start(self) -> None:
        """Open the spool and replay what a dead gateway left (before serving, so budgets seeded
        from the usage table include it; if the DB is down, the flush loop retries)."""
        self._sealed.extend(self.spool.open())
        if self._sealed:
            await self.flush()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if self._failures:  # the DB is failing: retry later, whatever arrives meanwhile
                await asyncio.sleep(min(self.config.flush_interval_s * 2**self._failures, MAX_BACKOFF_S))
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.config.flush_interval_s)
                except TimeoutError:
                    pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> bool:
        """Commit everything spooled so far; False if the DB refused it (kept for a retry)."""
        async with self._write_lock:
            unspooled, self._unspooled = self._unspooled, []
            for record in unspooled:
                self._spool(record)
            # Seal only when nothing older waits, so an outage keeps at most two segments open.
            if not self._sealed and (segment := self.spool.seal()) is not None:
                self._sealed.append(segment)
            while self._sealed:
                segment = self._sealed[0]
                try:
                    written = await run_in_threadpool(self._commit, segment)
                except Exception as exc:  # the DB is down: the segment stays, retried later
                    self._failures += 1
                    FAILED.inc()
                    fields = {"segment": segment.path.name, "attempt": self._failures, "error": repr(exc)}
                    log.error("usage write failed; will retry", extra={"fields": fields})
                    return False
                self._sealed.pop(0)
                self._failures = 0
                WRITTEN.inc(written)
            return True

    def _commit(self, segment: Segment) -> int:
        """fsync the segment, archive it (if configured), insert its records batch by batch,
        then delete it. Archiving first: if it fails nothing is inserted and all is retried;
        a retry after a failed insert writes the same archive key again."""
        segment.sync()
        if self.archive is not None:
            self.archive.put_file(archive_key(segment.path), segment.path, "application/jsonl")
        size, written = max(self.config.batch_size, 1), 0
        batch: list[Usage] = []
        for record in segment.records():
            row = _usage(record)
            if row is not None:
                batch.append(row)
            if len(batch) >= size:
                self.store.insert(batch)
                written, batch = written + len(batch), []
        self.store.insert(batch)
        segment.remove()
        return written + len(batch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if await self.flush():
            await self.flush()  # the open segment, sealed only once nothing older waited
        for segment in self._sealed:  # the DB is still down: the next start replays them
            segment.close()
        self._sealed.clear()
        self.spool.close()


class _Metered:
    """Wraps any ASGI response to see its status, cache header and final usage object, and
    spools the record before the client gets the response's last byte (so an answered request
    is never lost, even if the gateway is killed right after)."""

    __slots__ = (
        "inner",
        "meter",
        "principal",
        "model",
        "endpoint",
        "start",
        "status",
        "cache_hit",
        "tail",
        "recorded",
        "first_byte",
    )

    def __init__(
        self, inner: Any, meter: Meter, principal: Principal, model: str | None, endpoint: str, start: float
    ) -> None:
        self.inner = inner
        self.meter = meter
        self.principal = principal
        self.model = model
        self.endpoint = endpoint
        self.start = start
        self.status = 500
        self.cache_hit = False
        self.tail: bytes | bytearray = b""
        self.recorded = False
        self.first_byte: float | None = None  # monotonic time the answer's first body bytes left

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        inner = self.inner
        if isinstance(inner, Buffered):
            # Everything is known before it is sent: record, then send (no wrapper around `send`).
            self.status = inner.status_code
            self.cache_hit = (b"x-budrt-cache", b"hit") in inner.raw_headers
            self.tail = inner.body
            self._record()
            await inner(scope, receive, send)
            return
        if isinstance(inner, UpstreamStream):
            self.status = inner.status_code
            self.cache_hit = (b"x-budrt-cache", b"hit") in inner.raw_headers

            async def before_end(message: Message) -> None:
                if self.first_byte is None and message["type"] == "http.response.body":
                    self.first_byte = time.monotonic()
                if not message.get("more_body", False) and message["type"] == "http.response.body":
                    self.tail = inner.tail  # the stream is over: its final chunk is in the tail
                    self._record()
                await send(message)

            try:
                await inner(scope, receive, before_end)
            finally:
                self.tail = inner.tail
                self._record()  # the client left mid-stream: no last byte was sent
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body and self.first_byte is None:
                    self.first_byte = time.monotonic()
                if body:
                    # Usage is the last object of a body and of a stream's final chunk.
                    tail = self.tail + body if len(body) < STREAM_TAIL_BYTES else body
                    self.tail = tail[-STREAM_TAIL_BYTES:]
                if not message.get("more_body", False):
                    self._record()
            elif message["type"] == "http.response.start":
                self.status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-budrt-cache":
                        self.cache_hit = value == b"hit"
            await send(message)

        try:
            await inner(scope, receive, watch)
        finally:
            self._record()

    def _record(self) -> None:
        if self.recorded:
            return
        self.recorded = True
        usage: Any = None
        if self.status == 200:
            usage = getattr(self.inner, "usage", None)  # found already by the proxy
            if usage is None:
                pos = self.tail.rfind(b'"usage"')
                usage = self.tail[pos:] if pos >= 0 else None
        now = time.monotonic()
        latency_ms = (now - self.start) * 1000
        ttft_ms = ((self.first_byte or now) - self.start) * 1000  # a buffered answer: all at once
        self.meter.add(
            self.principal, self.model, self.endpoint, usage, latency_ms, self.status, self.cache_hit, ttft_ms
        )


def _count(value: Any, most: int = INT32_MAX) -> int:
    """A usage number as its column can hold it: 0 unless a non-negative integer, at most `most`
    (an upstream reporting 10**30 must not make the batch's insert fail forever)."""
    if value.__class__ is not int or value < 0:
        return 0
    return min(value, most)


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) tokens of a usage object; the Images API names them input/output."""
    if not usage:
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if prompt is None and completion is None:
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    return _count(prompt), _count(completion)


def _images(usage: dict[str, Any] | None) -> tuple[int, int, int]:
    """(images, pixels, steps) of an image answer's usage object; zeros for any other."""
    if not usage:
        return 0, 0, 0
    return _count(usage.get("images")), _count(usage.get("pixels"), INT64_MAX), _count(usage.get("steps"))


def _usage(record: Record) -> Usage | None:
    """The DB row of a spooled record; None (logged) for one this version cannot read."""
    try:
        if not isinstance(record, list):
            raise TypeError("not a record")
        rid, at, key_id, user, team, model, endpoint, prompt, completion, latency, status, hit = record[:12]
        images, pixels, steps = record[12:15] or (0, 0, 0)  # an older gateway's record ends at `hit`
        ttft = record[15] if len(record) > 15 else None
        at = datetime.fromtimestamp(at, UTC)
    except (ValueError, TypeError, OverflowError, OSError):
        log.warning("usage spool: skipped an unreadable record", extra={"fields": {"record": repr(record)}})
        return None
    return Usage(
        at=at,
        key_id=key_id,
        user=user,
        team=team,
        model=model,
        endpoint=endpoint,
        prompt_tokens=prompt,
        completion_tokens=completion,
        latency_ms=latency,
        status=status,
        cache_hit=hit,
        request_id=rid,
        images=images,
        pixels=pixels,
        steps=steps,
        ttft_ms=ttft,
    )


def metered(response: Any, meter: Meter | None, scope: Scope, endpoint: str, start: float) -> Any:
    """`response`, wrapped to record the request as it is sent.

    The request handler leaves the principal (and the model, once routed) in `scope`; requests
    that never authenticated are not metered.
    """
    principal = scope.get(PRINCIPAL)
    if meter is None or principal is None:
        return response
    return _Metered(response, meter, principal, scope.get(MODEL), endpoint, start)
