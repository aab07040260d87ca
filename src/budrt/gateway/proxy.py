"""Forwarding to model servers: failover before the first byte, pass-through after it.

Bodies go upstream as the client sent them and come back unchanged; the gateway only adds
the deployment's credentials and picks the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from starlette.responses import Response
from starlette.types import Receive

from budrt.config import GatewayConfig
from budrt.gateway.metrics import CLIENT_DISCONNECTS, UPSTREAM_ERRORS, RequestTracker
from budrt.gateway.routing import Deployment, Endpoint, cancelled_for_hang
from budrt.gateway.stream import UpstreamStream, pass_headers
from budrt.gateway.usage import record_usage
from budrt.protocol.errors import APIError

log = logging.getLogger("budrt.gateway.proxy")

CLIENT_CLOSED = 499  # nginx's status for "client went away"; only ever seen in metrics
BodyFor = Callable[[Deployment], bytes]  # the body to send to a deployment (fallbacks rename the model)


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
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}

    async def start(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=60)
        # No total timeout: streams may run for minutes. Per-deployment read timeouts apply.
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s),
            auto_decompress=False,
        )
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _timeout(self, dep: Deployment) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(dep.name)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.connect_timeout_s, sock_read=dep.timeout_s
            )
            self._timeouts[dep.name] = timeout
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
    ) -> Response | UpstreamStream:
        """Send to an endpoint of `chain[0]` (then its fallbacks); a client that disconnects
        cancels the upstream request, and so does the request deadline (-> 504)."""
        dep = chain[0]
        loop = asyncio.get_running_loop()
        disconnected = asyncio.ensure_future(wait_disconnect(receive))
        attempt = asyncio.ensure_future(self._attempts(chain, path, bodies, stream, affinity, extra_headers))
        # Plain callbacks instead of asyncio.wait and asyncio.timeout: together they were ~10% of
        # the gateway's CPU samples per request; this does the same with one future and one timer.
        expired = False

        def on_deadline() -> None:
            nonlocal expired
            expired = True
            attempt.cancel()

        timer = loop.call_later(self.config.request_deadline_s, on_deadline)
        first_done = loop.create_future()

        def wake(_: asyncio.Future[object]) -> None:
            if not first_done.done():
                first_done.set_result(None)

        attempt.add_done_callback(wake)
        disconnected.add_done_callback(wake)
        try:
            await first_done
        except asyncio.CancelledError:
            timer.cancel()
            attempt.cancel()
            disconnected.cancel()
            raise
        timer.cancel()
        disconnected.remove_done_callback(wake)
        if not attempt.done():
            attempt.cancel()  # closes the upstream connection
            CLIENT_DISCONNECTS.labels(dep.name).inc()
            tracker.done(CLIENT_CLOSED, time.monotonic())
            return Response(status_code=CLIENT_CLOSED)
        try:
            result = attempt.result()
        except asyncio.CancelledError:
            disconnected.cancel()
            if expired:
                raise APIError(
                    504, f"The model `{dep.name}` did not answer in time.", code="upstream_timeout"
                ) from None
            raise
        except BaseException:
            disconnected.cancel()
            raise
        if isinstance(result, Response):
            disconnected.cancel()
            return result
        served, ep, resp, first = result
        return UpstreamStream(served.name, ep, resp, first, extra_headers, disconnected, tracker)

    async def _attempts(
        self,
        chain: list[Deployment],
        path: str,
        bodies: BodyFor,
        stream: bool,
        affinity: str | None,
        extra: dict[str, str],
    ) -> Response | tuple[Deployment, Endpoint, aiohttp.ClientResponse, bytes]:
        assert self.session is not None, "Proxy.start() was not called"
        task = asyncio.current_task()
        assert task is not None
        last_5xx: Response | None = None
        timed_out = False
        failures = 0
        for dep in chain:
            timeout = self._timeout(dep)
            body = bodies(dep)
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
                        ep.url(path), data=body, headers=dep.upstream_headers, timeout=timeout
                    )
                    if stream and resp.status == 200:
                        # Wait for the first chunk here, so a server that accepts the request and
                        # then fails is still retried elsewhere: nothing has reached the client yet.
                        first = await resp.content.readany()
                        handed_off = True  # the stream response now owns `resp` and the count
                        if breaker.failures:
                            breaker.success()
                        return dep, ep, resp, first
                    data = await resp.read()
                    if resp.status >= 500:
                        UPSTREAM_ERRORS.labels(dep.name, f"http_{resp.status}").inc()
                        breaker.failure()
                        failures += 1
                        last_5xx = _buffered(resp, data, extra)
                        continue
                    if breaker.failures:
                        breaker.success()
                    if resp.status == 200:
                        record_usage(dep.name, data)
                    return _buffered(resp, data, extra)
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    read_timeout = isinstance(exc, TimeoutError) and not isinstance(
                        exc, aiohttp.ConnectionTimeoutError
                    )
                    timed_out = timed_out or read_timeout
                    UPSTREAM_ERRORS.labels(dep.name, "timeout" if read_timeout else "connect").inc()
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
                    UPSTREAM_ERRORS.labels(dep.name, "hung").inc()
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


def _buffered(resp: aiohttp.ClientResponse, data: bytes, extra: dict[str, str]) -> Response:
    headers = pass_headers(resp)
    if extra:  # merged here: setting headers on a built Response costs more per header
        headers.update(extra)
    return Response(data, status_code=resp.status, headers=headers)
