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
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from starlette.types import Receive

from budrt.config import GatewayConfig
from budrt.gateway.metrics import CLIENT_DISCONNECTS, UPSTREAM_ERRORS, RequestTracker, child
from budrt.gateway.routing import Deployment, Endpoint, cancelled_for_hang
from budrt.gateway.stream import Buffered, RawHeaders, UpstreamStream, encode_headers, pass_headers
from budrt.gateway.usage import record_usage
from budrt.protocol.errors import CLIENT_CLOSED, APIError

log = logging.getLogger("budrt.gateway.proxy")

BodyFor = Callable[[Deployment], bytes]  # the body to send to a deployment (fallbacks rename the model)
Admit = Callable[[Deployment], Awaitable[bool]]  # may this fallback be tried? (its own limits)
WATCH_AFTER_S = 0.1  # a request waits this long on its upstream before its client is watched
RETRIED_STATUSES = frozenset({401, 407, 502, 503, 504})  # the replica's failure: retried, counted


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects; the request body must already have been read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Proxy:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.session: aiohttp.ClientSession | None = None
        # By read timeout, not deployment: registered deployments come and go by name.
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def start(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=60)
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
    ) -> Buffered | UpstreamStream:
        """Send to an endpoint of `chain[0]` (then its fallbacks, each only if `admit` says so);
        a client that disconnects cancels the upstream request, and so does the request
        deadline (-> 504)."""
        dep = chain[0]
        extra = encode_headers(extra_headers) if extra_headers else []
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        # The attempts run in this task; a client disconnect or the deadline cancels it (and
        # the upstream request with it): no second task, no asyncio.wait/asyncio.timeout, which
        # were a visible share of the gateway's CPU per request. The disconnect watcher (a task
        # blocked in `receive`) starts only once the upstream has taken WATCH_AFTER_S: most
        # short requests never need one, and a long generation is still cut off at once.
        why: list[str] = []  # "client" or "deadline" once this task was cancelled by us
        watcher: asyncio.Future[None] | None = None

        def on_disconnect(_: asyncio.Future[None]) -> None:
            if not why:
                why.append("client")
                task.cancel()

        def on_deadline() -> None:
            if not why:
                why.append("deadline")
                task.cancel()

        def watch(left: float) -> None:
            nonlocal watcher, timer
            watcher = asyncio.ensure_future(wait_disconnect(receive))
            watcher.add_done_callback(on_disconnect)
            timer = loop.call_later(left, on_deadline)

        timer: asyncio.TimerHandle  # one timer at a time: first `watch`, then the deadline
        deadline = self.config.request_deadline_s
        if deadline > WATCH_AFTER_S:
            timer = loop.call_later(WATCH_AFTER_S, watch, deadline - WATCH_AFTER_S)
        else:
            watch(deadline)
        handed_off = taken_back = False
        try:
            result = await self._attempts(chain, path, bodies, stream, affinity, extra, admit)
            if isinstance(result, Buffered):
                return result
            served, ep, resp, first = result
            disconnected = watcher or asyncio.ensure_future(wait_disconnect(receive))
            handed_off = True  # the stream watches `disconnected` from now on
            return UpstreamStream(served.name, ep, resp, first, extra, disconnected, tracker)
        except asyncio.CancelledError:
            if not why:
                raise
            taken_back = True
            if task.uncancel() > 0:  # cancelled by someone else too (e.g. server shutdown)
                raise
            if why[0] == "deadline":
                raise APIError(
                    504, f"The model `{dep.name}` did not answer in time.", code="upstream_timeout"
                ) from None
            child(CLIENT_DISCONNECTS, dep.name).inc()
            tracker.done(CLIENT_CLOSED, time.monotonic())
            return Buffered(CLIENT_CLOSED, b"", [])
        finally:
            if why and not taken_back:
                task.uncancel()  # our cancel was absorbed below without reaching here
            # A callback scheduled already (the watcher finished just now) must not cancel
            # this task later, while it sends the response: `why` is no longer empty.
            why.append("done")
            timer.cancel()
            if watcher is not None:
                watcher.remove_done_callback(on_disconnect)
                if not handed_off:
                    watcher.cancel()

    async def _attempts(
        self,
        chain: list[Deployment],
        path: str,
        bodies: BodyFor,
        stream: bool,
        affinity: str | None,
        extra: RawHeaders,
        admit: Admit | None = None,
    ) -> Buffered | tuple[Deployment, Endpoint, aiohttp.ClientResponse, bytes]:
        assert self.session is not None, "Proxy.start() was not called"
        task = asyncio.current_task()
        assert task is not None
        last_5xx: Buffered | None = None
        timed_out = False
        failures = 0
        for dep in chain:
            timeout = self._timeout(dep)
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
                ep.outstanding += 1
                breaker = ep.breaker
                breaker.on_attempt(time.monotonic())
                handed_off = False
                resp: aiohttp.ClientResponse | None = None
                ep.waiters.add(task)  # a hang found by the health check cancels the wait
                try:
                    resp = await self.session.post(
                        ep.url(path), data=body, headers=ep.headers, timeout=timeout
                    )
                    if stream and resp.status == 200:
                        # Wait for the first chunk here, so a server that accepts the request and
                        # then fails is still retried elsewhere: nothing has reached the client yet.
                        first = await resp.content.readany()
                        handed_off = True  # the stream response now owns `resp` and the count
                        if breaker.failures:
                            breaker.success()
                        return dep, ep, resp, first
                    limit = self.config.max_response_bytes
                    length = resp.content_length  # known: the usual case, and no extra coroutine
                    data = await (
                        resp.read() if length is not None and length <= limit else read_bounded(resp, limit)
                    )
                    if data is None:
                        if breaker.probing:
                            breaker.success()  # it answered; the size is the request's doing
                        raise response_too_large(dep.name, limit)
                    if resp.status in RETRIED_STATUSES:
                        child(UPSTREAM_ERRORS, dep.name, f"http_{resp.status}").inc()
                        breaker.failure()
                        failures += 1
                        last_5xx = (
                            _buffered(resp, data, extra) if resp.status >= 500 else _refused(dep, extra)
                        )
                        continue
                    if breaker.failures and (resp.status < 400 or breaker.probing):
                        breaker.success()
                    out = _buffered(resp, data, extra)
                    if resp.status == 200:
                        out.usage = record_usage(dep.name, data)
                    return out
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    read_timeout = isinstance(exc, TimeoutError) and not isinstance(
                        exc, aiohttp.ConnectionTimeoutError
                    )
                    timed_out = timed_out or read_timeout
                    child(UPSTREAM_ERRORS, dep.name, "timeout" if read_timeout else "connect").inc()
                    log.warning(
                        "upstream attempt failed",
                        extra={"fields": {"url": ep.base_url, "error": type(exc).__name__}},
                    )
                    failures += 1
                    if isinstance(exc, aiohttp.ClientConnectorError):
                        ep.mark_down()  # refused: the process is gone
                    else:
                        breaker.failure()
                    if resp is not None:
                        resp.close()  # a half-read response must not go back to the pool
                except asyncio.CancelledError:  # client left, deadline, or the endpoint hung
                    if resp is not None:
                        resp.close()  # drop the upstream connection
                    if not cancelled_for_hang():
                        if breaker.probing:
                            breaker.probing = False  # let the next request probe instead
                        raise
                    # Nothing reached the client yet: try another replica.
                    child(UPSTREAM_ERRORS, dep.name, "hung").inc()
                    log.warning("upstream stopped answering", extra={"fields": {"url": ep.base_url}})
                    failures += 1
                    breaker.failure()
                finally:
                    ep.waiters.discard(task)
                    if not handed_off:
                        ep.outstanding -= 1
                        if resp is not None:
                            resp.release()  # fully read: keep the connection alive for reuse
        dep = chain[0]
        if last_5xx is not None:
            return last_5xx  # the model server's own error (503 keeps its Retry-After)
        if timed_out:
            raise APIError(504, f"The model `{dep.name}` did not answer in time.", code="upstream_timeout")
        raise APIError(
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
