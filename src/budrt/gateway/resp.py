"""A minimal pipelined Redis client for the rate limiter's hot path.

redis-py's asyncio client costs ~150 µs of CPU per command here (connection pool checkout,
retry wrappers, response-parser layers), which was the largest single cost of a proxied request.
This client keeps one connection, writes each command as soon as it is issued (so concurrent
requests pipeline on that one socket) and matches replies to callers in order: a few µs per
command. Only what the limiter needs: EVALSHA with a NOSCRIPT fallback, RESP2 replies.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse


class RespError(Exception):
    """An error reply from Redis (e.g. a script error)."""


class RespConnectionError(ConnectionError):
    pass


def encode_args(args: tuple[Any, ...] | list[Any]) -> bytes:
    """The arguments of a command as RESP bulk strings, without the array header."""
    out = []
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def encode(args: tuple[Any, ...] | list[Any]) -> bytes:
    return b"*%d\r\n" % len(args) + encode_args(args)


_INCOMPLETE = object()


def parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One reply from `buf[pos:]`: (value, next position), or (_INCOMPLETE, pos)."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind, line = buf[pos], bytes(buf[pos + 1 : end])
    nxt = end + 2
    if kind == 0x2B:  # + simple string
        return line, nxt
    if kind == 0x3A:  # : integer
        return int(line), nxt
    if kind == 0x2D:  # - error
        return RespError(line.decode(errors="replace")), nxt
    if kind == 0x24:  # $ bulk string
        n = int(line)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            return _INCOMPLETE, pos
        return bytes(buf[nxt : nxt + n]), nxt + n + 2
    if kind == 0x2A:  # * array
        n = int(line)
        if n < 0:
            return None, nxt
        items = []
        for _ in range(n):
            item, nxt = parse(buf, nxt)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return items, nxt
    raise RespConnectionError(f"unexpected reply type {kind!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.lost = False

    def flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(out))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while self.pending:
            try:
                value, nxt = parse(buf, pos)
            except (RespConnectionError, ValueError) as exc:
                self.fail(RespConnectionError(str(exc)))
                return
            if value is _INCOMPLETE:
                break
            pos = nxt
            fut, _ = self.pending.popleft()
            if not fut.done():
                if isinstance(value, RespError):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RespConnectionError("connection to Redis lost"))

    def fail(self, exc: Exception) -> None:
        self.lost = True
        while self.pending:
            fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


def tls_context(url: str) -> ssl.SSLContext | None:
    """For `rediss://`: a client context checking the server's certificate and host name, from
    the query parameters redis-py reads too (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`), so
    one URL configures the limiter's client and the cache's alike. None for `redis://`."""
    u = urlparse(url)
    if u.scheme != "rediss":
        return None
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}
    unknown = set(query) - {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}
    if unknown:
        raise ValueError(f"unsupported rediss:// parameter {sorted(unknown)[0]!r}")
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if "ssl_certfile" in query:  # a server that asks for a client certificate
        context.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile"))
    return context


class RespClient:
    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        u = urlparse(url)
        if u.scheme not in ("redis", "rediss", ""):
            raise ValueError(f"unsupported Redis URL scheme {u.scheme!r} (use redis:// or rediss://)")
        self.tls = tls_context(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 6379
        self.password = unquote(u.password) if u.password else None
        self.username = unquote(u.username) if u.username else None
        self.db = int(u.path.lstrip("/") or 0)
        self.timeout_s = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout_s):
            _, proto = await loop.create_connection(_Protocol, self.host, self.port, ssl=self.tls)
            self._proto = proto
            if self.password:
                auth = [self.username, self.password] if self.username else [self.password]
                await self._send(proto, ["AUTH", *auth])
            if self.db:
                await self._send(proto, ["SELECT", self.db])
        return proto

    async def _get(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        if self._connecting is None:  # one connect shared by everyone waiting
            self._connecting = asyncio.ensure_future(self._connect())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        except OSError as exc:
            raise RespConnectionError(str(exc)) from exc
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None

    def _send(self, proto: _Protocol, args: list[Any] | tuple[Any, ...]) -> asyncio.Future[Any]:
        return self._send_packed(proto, encode(args))

    def _send_packed(self, proto: _Protocol, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        # Commands issued in one event-loop turn go out in one write (one syscall).
        if not proto.out:
            loop.call_soon(proto.flush)
        proto.out.append(packed)
        proto.pending.append((fut, time.monotonic()))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout_s, self._check)
        return fut

    def _check(self) -> None:
        """A reply overdue by more than the timeout: the connection is stuck, drop it."""
        self._watchdog = None
        proto = self._proto
        if proto is None or not proto.pending:
            return
        if time.monotonic() - proto.pending[0][1] > self.timeout_s:
            proto.fail(RespConnectionError("Redis did not answer in time"))
        else:
            self._watchdog = asyncio.get_running_loop().call_later(self.timeout_s / 2, self._check)

    async def call(self, *args: Any) -> Any:
        return await self._send(await self._get(), args)

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self.evalsha_packed(script, encode(["EVALSHA", sha, len(keys), *keys, *args]))

    async def evalsha_packed(self, script: str, packed: bytes) -> Any:
        """`packed`: a whole encoded EVALSHA command; the script is loaded if Redis lacks it."""
        try:
            return await self._send_packed(await self._get(), packed)
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            await self.call("SCRIPT", "LOAD", script)
            return await self._send_packed(await self._get(), packed)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
