"""Usage metering: one record per request, queued in memory, written to the DB in batches.

The request path only appends a record to a list. A background task writes a batch every
`flush_interval_s`, or sooner when `batch_size` records are waiting, in a worker thread; the
lifespan's `close` writes whatever is left, so a clean stop loses nothing. A full queue drops
records (counted in `budrt_gateway_usage_dropped_total`) rather than grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from budrt.config import MeteringConfig
from budrt.gateway.stream import Buffered, UpstreamStream
from budrt.gateway.usage import STREAM_TAIL_BYTES, find_usage
from budrt.security.rbac import Principal
from budrt.store.usage import Usage, UsageStore

log = logging.getLogger("budrt.gateway.metering")

DROPPED = Counter("budrt_gateway_usage_dropped_total", "Usage records dropped (queue full or DB error)")
WRITTEN = Counter("budrt_gateway_usage_written_total", "Usage records written to the database")

# What the request path queues: (unix time, principal, model, endpoint, usage (the object, or
# the raw bytes that hold it), latency ms, status, cache hit). A plain tuple: building it costs
# next to nothing.
Pending = tuple[float, Principal, str | None, str, dict[str, Any] | bytes | None, float, int, bool]

# Where the request handler leaves what the meter needs (request.scope keys).
PRINCIPAL = "budrt.principal"
MODEL = "budrt.model"


class Meter:
    def __init__(self, store: UsageStore, config: MeteringConfig) -> None:
        self.store = store
        self.config = config
        self._queue: list[Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()  # batches reach the DB in order, one at a time

    def add(self, record: Pending) -> None:
        if len(self._queue) >= self.config.max_queue:
            DROPPED.inc()
            return
        self._queue.append(record)
        if len(self._queue) >= self.config.batch_size:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write everything queued so far (in batches of `batch_size`)."""
        async with self._write_lock:
            while self._queue:
                batch = self._queue[: self.config.batch_size]
                del self._queue[: len(batch)]
                try:
                    await run_in_threadpool(self._write, batch)
                    WRITTEN.inc(len(batch))
                except Exception as exc:  # the DB is down: count the loss, keep serving
                    DROPPED.inc(len(batch))
                    fields = {"records": len(batch), "error": repr(exc)}
                    log.error("usage write failed", extra={"fields": fields})

    def _write(self, batch: list[Pending]) -> None:
        self.store.insert([_usage(p) for p in batch])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()


class _Metered:
    """Wraps any ASGI response to see its status, cache header and final usage object."""

    __slots__ = ("inner", "meter", "principal", "model", "endpoint", "start", "status", "cache_hit", "tail")

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
        self.tail = b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        inner = self.inner
        # The gateway's own responses say what the meter needs once sent: no wrapper around
        # `send` (a coroutine layer per message) for them.
        if isinstance(inner, Buffered | UpstreamStream):
            try:
                await inner(scope, receive, send)
            finally:
                self.status = inner.status_code
                self.cache_hit = (b"x-budrt-cache", b"hit") in inner.raw_headers
                self.tail = inner.body if isinstance(inner, Buffered) else inner.tail
                self._record()
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body:
                    # Usage is the last object of a body and of a stream's final chunk.
                    tail = self.tail + body if len(body) < STREAM_TAIL_BYTES else body
                    self.tail = tail[-STREAM_TAIL_BYTES:]
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
        # Only cheap work here; the usage object is located now but decoded by the writer.
        usage = None
        if self.status == 200:
            usage = getattr(self.inner, "usage", None)  # found already by the proxy
            if usage is None:
                pos = self.tail.rfind(b'"usage"')
                usage = self.tail[pos:] if pos >= 0 else None
        latency_ms = (time.monotonic() - self.start) * 1000
        self.meter.add(
            (
                time.time(),
                self.principal,
                self.model,
                self.endpoint,
                usage,
                latency_ms,
                self.status,
                self.cache_hit,
            )
        )


def _usage(pending: Pending) -> Usage:
    at, principal, model, endpoint, raw, latency_ms, status, cache_hit = pending
    usage = (raw if isinstance(raw, dict) else find_usage(raw)) if raw else None
    prompt = completion = 0
    if usage:
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt = p if isinstance(p, int) else 0
        completion = c if isinstance(c, int) else 0
    return Usage(
        at=datetime.fromtimestamp(at, UTC),
        key_id=principal.key_id,
        user=principal.user,
        team=principal.team,
        model=model,
        endpoint=endpoint,
        prompt_tokens=prompt,
        completion_tokens=completion,
        latency_ms=latency_ms,
        status=status,
        cache_hit=cache_hit,
    )


def metered(response: Any, meter: Meter | None, scope: Scope, endpoint: str, start: float) -> Any:
    """`response`, wrapped to record the request once it is sent.

    The request handler leaves the principal (and the model, once routed) in `scope`; requests
    that never authenticated are not metered.
    """
    principal = scope.get(PRINCIPAL)
    if meter is None or principal is None:
        return response
    return _Metered(response, meter, principal, scope.get(MODEL), endpoint, start)
