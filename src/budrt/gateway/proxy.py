"""Forwarding to model servers: failover before the first byte, pass-through after it.

Bodies go upstream as the client sent them and come back unchanged; the gateway only adds
the deployment's credentials and picks the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from budrt.config import GatewayConfig
from budrt.gateway.metrics import CLIENT_DISCONNECTS, UPSTREAM_ERRORS, RequestTracker
from budrt.gateway.routing import Deployment, Endpoint, Router
from budrt.gateway.usage import STREAM_TAIL_BYTES, record_usage
from budrt.protocol.errors import APIError

log = logging.getLogger("budrt.gateway.proxy")

# Response headers that describe the upstream connection rather than the content.
_DROP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date", "server"}
)
CLIENT_CLOSED = 499  # nginx's status for "client went away"; only ever seen in metrics


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
        dep: Deployment,
        path: str,
        body: bytes,
        stream: bool,
        tracker: RequestTracker,
        extra_headers: dict[str, str],
    ) -> Response | UpstreamStream:
        """Send to an endpoint of `dep`; the client disconnecting cancels the upstream request."""
        disconnected = asyncio.ensure_future(wait_disconnect(receive))
        attempt = asyncio.ensure_future(self._attempts(dep, path, body, stream))
        try:
            await asyncio.wait((attempt, disconnected), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            attempt.cancel()
            disconnected.cancel()
            raise
        if not attempt.done():
            attempt.cancel()  # closes the upstream connection
            CLIENT_DISCONNECTS.labels(dep.name).inc()
            tracker.done(CLIENT_CLOSED, time.monotonic())
            return Response(status_code=CLIENT_CLOSED)
        try:
            result = attempt.result()
        except BaseException:
            disconnected.cancel()
            raise
        if isinstance(result, Response):
            disconnected.cancel()
            result.headers.update(extra_headers)
            return result
        ep, resp, first = result
        return UpstreamStream(dep.name, ep, resp, first, extra_headers, disconnected, tracker)

    async def _attempts(
        self, dep: Deployment, path: str, body: bytes, stream: bool
    ) -> Response | tuple[Endpoint, aiohttp.ClientResponse, bytes]:
        assert self.session is not None, "Proxy.start() was not called"
        timeout = self._timeout(dep)
        tried: set[Endpoint] = set()
        last_5xx: Response | None = None
        timed_out = False
        for _ in range(self.config.retries + 1):
            ep = Router.pick(dep, tried)
            if ep is None:
                break
            tried.add(ep)
            ep.outstanding += 1
            handed_off = False
            resp: aiohttp.ClientResponse | None = None
            try:
                resp = await self.session.post(
                    ep.base_url + path, data=body, headers=dep.upstream_headers, timeout=timeout
                )
                if stream and resp.status == 200:
                    # Wait for the first chunk here, so a server that accepts the request and
                    # then fails is still retried elsewhere: nothing has reached the client yet.
                    first = await resp.content.readany()
                    handed_off = True  # the stream response now owns `resp` and the count
                    return ep, resp, first
                data = await resp.read()
                if resp.status >= 500:
                    UPSTREAM_ERRORS.labels(dep.name, f"http_{resp.status}").inc()
                    last_5xx = _buffered(resp, data)
                    continue
                if resp.status == 200:
                    record_usage(dep.name, data)
                return _buffered(resp, data)
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
                ep.mark_down()
                if resp is not None:
                    resp.close()  # a half-read response must not go back to the pool
            except asyncio.CancelledError:  # the client left: drop the upstream connection
                if resp is not None:
                    resp.close()
                raise
            finally:
                if not handed_off:
                    ep.outstanding -= 1
                    if resp is not None:
                        resp.release()  # fully read: keep the connection alive for reuse
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


def _pass_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.lower() not in _DROP_HEADERS}


def _buffered(resp: aiohttp.ClientResponse, data: bytes) -> Response:
    return Response(data, status_code=resp.status, headers=_pass_headers(resp))


class UpstreamStream:
    """An ASGI response relaying an upstream SSE stream chunk by chunk, as received."""

    def __init__(
        self,
        model: str,
        ep: Endpoint,
        resp: aiohttp.ClientResponse,
        first: bytes,
        extra_headers: dict[str, str],
        disconnected: asyncio.Future[None],
        tracker: RequestTracker,
    ) -> None:
        self.model = model
        self.ep = ep
        self.resp = resp
        self.first = first
        self.status_code = resp.status
        headers = _pass_headers(resp)
        headers.update(extra_headers)
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.disconnected = disconnected
        self.tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        try:
            await asyncio.wait((pump, self.disconnected), return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                CLIENT_DISCONNECTS.labels(self.model).inc()
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            else:
                pump.result()  # re-raise anything unexpected (after headers: uvicorn drops it)
        finally:
            pump.cancel()
            self.disconnected.cancel()
            self.resp.close()  # drops the upstream connection if the stream did not finish
            self.ep.outstanding -= 1
            self.tracker.done(self.status_code, time.monotonic())

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        tail = bytearray(self.first)
        try:
            await send({"type": "http.response.body", "body": self.first, "more_body": True})
        except OSError:
            return
        try:
            async for chunk in self.resp.content.iter_any():
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:
                    return  # the client went away; the caller closes the upstream response
                tail += chunk
                if len(tail) > 2 * STREAM_TAIL_BYTES:
                    del tail[:-STREAM_TAIL_BYTES]
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Headers are sent, so no status can change; an SSE error event is what OpenAI
            # clients understand (they raise on an event carrying "error").
            UPSTREAM_ERRORS.labels(self.model, "stream_broken").inc()
            fields = {"url": self.ep.base_url, "error": repr(exc)}
            log.warning("upstream stream broke", extra={"fields": fields})
            error = APIError(502, "The model server closed the stream unexpectedly.", code="upstream_error")
            await _send_quietly(send, b"data: " + orjson.dumps(error.body()) + b"\n\n")
        record_usage(self.model, tail)
        await _send_quietly(send, b"", more_body=False)


async def _send_quietly(send: Send, body: bytes, more_body: bool = True) -> None:
    try:
        await send({"type": "http.response.body", "body": body, "more_body": more_body})
    except OSError:
        pass
