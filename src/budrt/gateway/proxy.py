"""Forwarding to model servers: failover before the first byte, pass-through after it.

Bodies go upstream as the client sent them and come back unchanged; the gateway only adds
the endpoint's credentials and picks the endpoint.

What an attempt's outcome does (only what a client cannot cause counts against a replica):
- connection refused: the replica is ejected at once; other connection errors, timeouts, a
  hung replica and 502/503/504: a failure for its circuit breaker, and the request is retried
  on another replica (the last 502/503/504 is relayed when none is left);
- 401/407: the replica refused the gateway's own credentials (the client's never go upstream):
  counted and retried like a 502, and answered as a 502 `upstream_auth_failed` of our own, as
  the upstream's body may quote the key it refused;
- any other answer, 500 included, is relayed to the client as it came, not retried and not
  counted: a 4xx is about the request, and a request can make a healthy server answer 500, so a
  loop of bad requests must not eject replicas for everyone. It resets no failure count either,
  but ends a half-open probe as a success (the replica answered);
- a non-streaming body over `max_response_bytes` is a 502 (`upstream_response_too_large`), not
  retried (the same request would get the same body elsewhere) and not held against the replica
  (a request can ask for a large answer); the read stops there, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import orjson
from starlette.types import Receive

from budrt.config import GatewayConfig
from budrt.gateway.breaker import Verdict
from budrt.gateway.metrics import CLIENT_DISCONNECTS, UPSTREAM_ERRORS, RequestTracker, child
from budrt.gateway.routing import Deployment, Endpoint, cancelled_for_hang
from budrt.gateway.stream import Buffered, RawHeaders, UpstreamStream, encode_headers, pass_headers
from budrt.gateway.usage import record_usage
from budrt.observe.tracing import Attributes, RequestScope, current_request
from budrt.protocol.errors import CLIENT_CLOSED, APIError
from budrt.protocol.http_server import UPSTREAM_KEEPALIVE_S

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("budrt.gateway.proxy")

BodyFor = Callable[[Deployment], bytes]  # the body to send to a deployment (fallbacks rename the model)
Admit = Callable[[Deployment], Awaitable[bool]]  # may this fallback be tried? (its own limits)
WATCH_AFTER_S = 0.1  # a request waits this long on its upstream before its client is watched
RETRIED_STATUSES = frozenset({401, 407, 502, 503, 504})  # the replica's failure: retried, counted


# -- what one attempt came to; `verdict` is what it tells the replica's breaker --


@dataclass(slots=True)
class Answered:
    """A whole answer to relay to the client (or our own 502 in its place)."""

    response: Buffered
    verdict: Verdict  # "ok" below 400; "answered" for a 4xx or 500, which the request may cause


@dataclass(slots=True)
class Streaming:
    """A stream whose first chunk arrived: from now on it is relayed, never retried."""

    dep: Deployment
    ep: Endpoint  # its `outstanding` count is the stream's to give back
    resp: aiohttp.ClientResponse
    first: bytes
    verdict: Verdict = "ok"


@dataclass(slots=True)
class Failed:
    """The replica's failure: counted against it, and the request tried on another one."""

    reason: str  # the UPSTREAM_ERRORS label: "connect", "timeout", "hung", "http_502"...
    verdict: Verdict  # "failed", or "down" (refused: the process is gone)
    relay: Buffered | None = None  # what the client gets if no replica is left (a 502/503/504)
    timed_out: bool = False  # a read timeout: a 504 if no replica is left
    # The connection closed before any answer: on a reused keep-alive connection the endpoint was
    # closing as the request went out (uvicorn closes idle ones after 5 s). One more try there.
    unanswered_close: bool = False


@dataclass(slots=True)
class Fatal:
    """Not retried and not held against the replica (it answered; the request is the cause)."""

    error: APIError
    verdict: Verdict = "answered"


Outcome = Answered | Streaming | Failed | Fatal


@dataclass(slots=True)
class Call:
    """What every attempt of one request shares."""

    path: str  # appended to an endpoint's URL
    stream: bool
    extra: RawHeaders  # the gateway's own response headers (rate limits, cache)
    task: asyncio.Task[object]  # the request's task: a hung endpoint cancels it (`Endpoint.waiters`)
    content_type: str | None = None  # the body's, when not JSON (a multipart image edit)
    request: RequestScope | None = None  # its id and trace, which every attempt carries upstream


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects; the request body must already have been read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Watch:
    """Cancels the request's task, which runs the attempts, when its client disconnects or its
    deadline passes: no second task and no asyncio.wait/asyncio.timeout, which were a visible
    share of the gateway's CPU per request. The disconnect watcher (a task blocked in `receive`)
    starts only once the upstream has taken WATCH_AFTER_S: most short requests never need one,
    and a long generation is still cut off at once. One timer at a time: the start of the
    watcher, then the deadline."""

    __slots__ = ("task", "receive", "reason", "watcher", "timer", "taken_back", "handed_off")

    def __init__(self, task: asyncio.Task[object], receive: Receive, deadline_s: float) -> None:
        self.task = task
        self.receive = receive
        self.reason: str | None = None  # "client" or "deadline" once it cancelled the task; "done" after
        self.watcher: asyncio.Future[None] | None = None
        self.taken_back = False  # the cancel reached `take_back`
        self.handed_off = False  # the watcher is a stream's now (`hand_off`)
        if deadline_s > WATCH_AFTER_S:
            self.timer = asyncio.get_running_loop().call_later(
                WATCH_AFTER_S, self._start, deadline_s - WATCH_AFTER_S
            )
        else:
            self._start(deadline_s)

    def _start(self, left_s: float) -> None:
        self.watcher = asyncio.ensure_future(wait_disconnect(self.receive))
        self.watcher.add_done_callback(self._on_disconnect)
        self.timer = asyncio.get_running_loop().call_later(left_s, self._cancel, "deadline")

    def _on_disconnect(self, _: asyncio.Future[None]) -> None:
        self._cancel("client")

    def _cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.task.cancel()

    def take_back(self) -> str | None:
        """In `except CancelledError`: why this watch cancelled the task ("client", "deadline"),
        the cancel taken back; None when the cancel is someone else's (e.g. server shutdown),
        to be re-raised."""
        if self.reason is None:
            return None
        self.taken_back = True
        return None if self.task.uncancel() > 0 else self.reason

    def hand_off(self) -> asyncio.Future[None]:
        """The disconnect watcher, for a stream to watch from now on (started if not yet)."""
        self.handed_off = True
        return self.watcher or asyncio.ensure_future(wait_disconnect(self.receive))

    def close(self) -> None:
        if self.reason is not None and not self.taken_back:
            self.task.uncancel()  # our cancel was absorbed below without reaching `take_back`
        # A callback scheduled already (the watcher finished just now) must not cancel the task
        # later, while it sends the response.
        self.reason = self.reason or "done"
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.remove_done_callback(self._on_disconnect)
            if not self.handed_off:
                self.watcher.cancel()


class Proxy:
    def __init__(self, config: GatewayConfig, tls: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.tls = tls  # `certs.upstream_context` with `tls.enabled`; else the system's defaults
        self.session: aiohttp.ClientSession | None = None
        # By read timeout, not deployment: registered deployments come and go by name.
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def start(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=0,
            keepalive_timeout=UPSTREAM_KEEPALIVE_S,
            ttl_dns_cache=60,
            ssl=self.tls if self.tls is not None else True,
        )
        # No total timeout: streams may run for minutes. Per-deployment read timeouts apply.
        # No cookie jar: one session serves every client, so upstream cookies must not stick.
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s),
            auto_decompress=False,
        )
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _timeout(self, dep: Deployment) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(dep.timeout_s)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.connect_timeout_s, sock_read=dep.timeout_s
            )
            self._timeouts[dep.timeout_s] = timeout
        return timeout

    async def forward(
        self,
        receive: Receive,
        chain: list[Deployment],
        path: str,
        bodies: BodyFor,
        stream: bool,
        tracker: RequestTracker,
        extra_headers: dict[str, str],
        affinity: str | None = None,
        admit: Admit | None = None,
        content_type: str | None = None,
    ) -> Buffered | UpstreamStream:
        """Send to an endpoint of `chain[0]` (then its fallbacks, each only if `admit` says so);
        a client that disconnects cancels the upstream request, and so does the request
        deadline (-> 504)."""
        task = asyncio.current_task()
        assert task is not None
        extra = encode_headers(extra_headers) if extra_headers else []
        request = current_request()
        if request is not None and request.trace is not None:
            request.trace.step(None)  # the gateway's phases are over (the cache's, if any)
        watch = Watch(task, receive, self.config.request_deadline_s)
        try:
            call = Call(path, stream, extra, task, content_type, request)
            result = await self._attempts(chain, call, bodies, affinity, admit)
            if isinstance(result, Buffered):
                return result
            disconnected = watch.hand_off()
            return UpstreamStream(
                result.dep.name, result.ep, result.resp, result.first, extra, disconnected, tracker
            )
        except asyncio.CancelledError:
            reason = watch.take_back()
            if reason is None:
                raise
            name = chain[0].name
            if reason == "deadline":
                raise APIError(
                    504, f"The model `{name}` did not answer in time.", code="upstream_timeout"
                ) from None
            child(CLIENT_DISCONNECTS, name).inc()
            tracker.done(CLIENT_CLOSED, time.monotonic())
            return Buffered(CLIENT_CLOSED, b"", [])
        finally:
            watch.close()

    async def _attempts(
        self, chain: list[Deployment], call: Call, bodies: BodyFor, affinity: str | None, admit: Admit | None
    ) -> Buffered | Streaming:
        """Endpoints of `chain[0]` by its strategy, then of each fallback `admit` lets in, each
        deployment up to 1 + `retries` of them, with a backoff after a failure, until one answers."""
        last_5xx: Buffered | None = None
        timed_out = False
        failures = 0
        for dep in chain:
            body = bodies(dep)
            if admit is not None and dep is not chain[0]:  # a fallback: one that can answer, if admitted
                if dep.pick(None, affinity) is None or not await admit(dep):
                    continue
            tried: set[Endpoint] = set()
            for _ in range(self.config.retries + 1):
                ep = dep.pick(tried, affinity)
                if ep is None:
                    break
                if failures:  # backoff before a retry, so a struggling fleet is not hammered
                    await asyncio.sleep(self.config.retry_backoff_s * (2 ** min(failures - 1, 5)))
                tried.add(ep)
                try:
                    outcome = await self._on_endpoint(dep, ep, body, call)
                except asyncio.CancelledError:  # the client left or the deadline passed
                    ep.breaker.record("abandoned")
                    raise
                ep.breaker.record(outcome.verdict)
                if isinstance(outcome, Answered):
                    return outcome.response
                if isinstance(outcome, Streaming):
                    return outcome
                if isinstance(outcome, Fatal):
                    raise outcome.error
                child(UPSTREAM_ERRORS, dep.name, outcome.reason).inc()
                failures += 1
                timed_out = timed_out or outcome.timed_out
                if outcome.relay is not None:
                    last_5xx = outcome.relay
        if last_5xx is not None:
            return last_5xx  # the model server's own error (503 keeps its Retry-After)
        raise none_answered(chain[0], timed_out)

    async def _on_endpoint(self, dep: Deployment, ep: Endpoint, body: bytes, call: Call) -> Outcome:
        """`_traced`, and once more if the endpoint closed the connection before answering: a
        reused connection it was closing at that moment is no fault of the endpoint's, and with
        one replica there is nowhere else to go. The second try finds that connection gone from
        the pool; a process that is down then refuses it, as any first try."""
        outcome = await self._traced(dep, ep, body, call)
        if isinstance(outcome, Failed) and outcome.unanswered_close:
            outcome = await self._traced(dep, ep, body, call)
        return outcome

    async def _traced(self, dep: Deployment, ep: Endpoint, body: bytes, call: Call) -> Outcome:
        """`_attempt`, as a CLIENT span of the request's trace when it is sampled."""
        trace = call.request.trace if call.request is not None else None
        if trace is None or not trace.sampled:
            return await self._attempt(dep, ep, body, call)
        span = trace.open("upstream", {"budrt.deployment": dep.name, "url.full": str(ep.url(call.path))})
        try:
            outcome = await self._attempt(dep, ep, body, call, span)
        except BaseException:  # the client left, the deadline passed
            trace.close(span, {"budrt.outcome": "abandoned"}, failed=True)
            raise
        trace.close(span, _describe(outcome), failed=isinstance(outcome, Failed | Fatal))
        return outcome

    async def _attempt(
        self, dep: Deployment, ep: Endpoint, body: bytes, call: Call, span: Span | None = None
    ) -> Outcome:
        """One request to `ep` (under `span`, if traced). Only a cancel that is not the
        endpoint's hang escapes."""
        assert self.session is not None, "Proxy.start() was not called"
        ep.outstanding += 1
        ep.breaker.on_attempt(time.monotonic())
        ep.waiters.add(call.task)  # a hang found by the health check cancels the wait
        resp: aiohttp.ClientResponse | None = None
        started = False
        try:
            headers = (
                ep.headers if call.content_type is None else {**ep.headers, "Content-Type": call.content_type}
            )
            if call.request is not None:  # its id, and its trace context when tracing is on
                headers = {**headers, **call.request.upstream_headers(span)}
            resp = await self.session.post(
                ep.url(call.path), data=body, headers=headers, timeout=self._timeout(dep)
            )
            if call.stream and resp.status == 200:
                # Wait for the first chunk here, so a server that accepts the request and then
                # fails is still retried elsewhere: nothing has reached the client yet.
                first = await resp.content.readany()
                started = True  # the stream response now owns `resp` and the count
                return Streaming(dep, ep, resp, first)
            limit = self.config.max_response_bytes
            length = resp.content_length  # known: the usual case, and no extra coroutine
            data = await (
                resp.read() if length is not None and length <= limit else read_bounded(resp, limit)
            )
            return judge(dep, resp, data, call.extra, limit)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if resp is not None:
                resp.close()  # a half-read response must not go back to the pool
            return broken(ep, exc, answering=resp is not None)
        except asyncio.CancelledError:  # client left, deadline, or the endpoint hung
            if resp is not None:
                resp.close()  # drop the upstream connection
            if not cancelled_for_hang():
                raise
            log.warning("upstream stopped answering", extra={"fields": {"url": ep.base_url}})
            return Failed("hung", "failed")  # nothing reached the client yet: try another replica
        finally:
            ep.waiters.discard(call.task)
            if not started:
                ep.outstanding -= 1
                if resp is not None:
                    resp.release()  # fully read: keep the connection alive for reuse


def judge(
    dep: Deployment, resp: aiohttp.ClientResponse, data: bytes | None, extra: RawHeaders, limit: int
) -> Outcome:
    """A whole upstream answer (`data` None: over `limit`): relayed, retried, or refused."""
    if data is None:
        return Fatal(response_too_large(dep.name, limit))
    status = resp.status
    if status in RETRIED_STATUSES:
        relay = _buffered(resp, data, extra) if status >= 500 else _refused(dep, extra)
        return Failed(f"http_{status}", "failed", relay)
    out = _buffered(resp, data, extra)
    if status == 200:
        out.usage = record_usage(dep.name, data)
    return Answered(out, "ok" if status < 400 else "answered")


def _describe(outcome: Outcome) -> Attributes:
    """An attempt's outcome as attributes of its span."""
    if isinstance(outcome, Answered):
        return {"http.response.status_code": outcome.response.status_code, "budrt.outcome": outcome.verdict}
    if isinstance(outcome, Streaming):
        return {"http.response.status_code": outcome.resp.status, "budrt.outcome": "streaming"}
    if isinstance(outcome, Failed):
        relayed = {"http.response.status_code": outcome.relay.status_code} if outcome.relay else {}
        return {"budrt.outcome": outcome.reason, **relayed}
    error = outcome.error
    return {"http.response.status_code": error.status, "budrt.outcome": error.code or "refused"}


def broken(ep: Endpoint, exc: Exception, answering: bool) -> Failed:
    """A connection error or timeout (aiohttp, or the OS); `answering`: after the answer's head."""
    read_timeout = isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ConnectionTimeoutError)
    log.warning(
        "upstream attempt failed", extra={"fields": {"url": ep.base_url, "error": type(exc).__name__}}
    )
    refused = isinstance(exc, aiohttp.ClientConnectorError)  # the process is gone
    reset = isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    closed = isinstance(exc, aiohttp.ServerDisconnectedError) or (reset and not refused)
    return Failed(
        "timeout" if read_timeout else "connect",
        "down" if refused else "failed",
        timed_out=read_timeout,
        unanswered_close=closed and not answering,
    )


def none_answered(dep: Deployment, timed_out: bool) -> APIError:
    if timed_out:
        return APIError(504, f"The model `{dep.name}` did not answer in time.", code="upstream_timeout")
    return APIError(
        503,
        f"No healthy endpoint is available for model `{dep.name}`; retry shortly.",
        code="no_healthy_upstream",
        headers={"Retry-After": "1"},
    )


async def read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None (and the connection dropped) as soon as it is known to exceed
    `limit` bytes: nothing more is read."""
    length = resp.content_length
    if length is not None and length <= limit:  # the usual case: the parser stops at the length
        return await resp.read()
    if length is None:  # chunked: count as it comes
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
    resp.close()
    return None


def response_too_large(model: str, limit: int) -> APIError:
    child(UPSTREAM_ERRORS, model, "too_large").inc()
    log.warning("upstream response too large", extra={"fields": {"model": model, "limit": limit}})
    message = f"The model `{model}` sent a response larger than this gateway's limit of {limit} bytes."
    return APIError(502, message, code="upstream_response_too_large")


def _refused(dep: Deployment, extra: RawHeaders) -> Buffered:
    message = f"The server of model `{dep.name}` refused this gateway's credentials."
    body = orjson.dumps(APIError(502, message, code="upstream_auth_failed").body())
    return Buffered(502, body, [(b"content-type", b"application/json")], extra)


def _buffered(resp: aiohttp.ClientResponse, data: bytes, extra: RawHeaders) -> Buffered:
    return Buffered(resp.status, data, pass_headers(resp), extra)
