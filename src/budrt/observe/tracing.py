"""Traces: one OpenTelemetry trace per request, from the gateway into the model server.

Off by default (`tracing` in the settings). A process that traces builds one `Tracing` at start
(`setup_tracing`); with tracing off there is none, and the request path checks for it once.

Every request, traced or not, gets a `RequestScope` in a context variable: its id (the caller's
`x-request-id` when it is a plain token, else a new one; answered in the same header) and its
`RequestTrace`. The JSON log lines (observe/logging.py) and the calls to upstreams read it there.

Whether a request is sampled is decided once, where it enters: a valid W3C `traceparent` carries
its caller's decision, else `sample_ratio` decides. An unsampled request makes no span object at
all (the gateway's throughput with tracing on at 1% is measured); it still passes its trace id on,
flagged "not sampled", so that the model server does not start a trace of its own for it.

Phases that run across code which cannot hold a span open (auth, limits... in the gateway; queue,
prefill, decode in a model server, told from when its outputs arrive) are recorded as finished
spans with explicit start and end times (`RequestTrace.step`, `RequestTrace.record`).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:  # imported when tracing is set up: a process that never traces never loads them
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

REQUEST_ID_HEADER = b"x-request-id"
# version-trace_id-parent_id-flags, lower-case hex (W3C Trace Context).
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# A caller's request id is kept when it is a plain token: it goes into log lines and headers.
_REQUEST_ID = re.compile(rb"[!-~]{1,128}")

Attributes = dict[str, str | int | float | bool]


class TracingSettings(Protocol):
    """What tracing is set up from: `budrt.config.TracingConfig` (observe imports no config)."""

    enabled: bool
    endpoint: str | None
    sample_ratio: float
    service_name: str | None


def setup_tracing(
    config: TracingSettings,
    service: str,
    exporter: SpanExporter | None = None,
    resource: Attributes | None = None,
) -> Tracing | None:
    """This process's `Tracing`, or None when `config` leaves tracing off.

    Spans go to `exporter` as each one ends (tests), else in batches over OTLP/HTTP to
    `config.endpoint` (the SDK's OTEL_BSP_* variables tune the batches), else nowhere (the log
    lines still carry trace ids). `service`: the service name unless `config` names one.
    """
    if not config.enabled:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    attributes = {**(resource or {}), "service.name": config.service_name or service}
    # Sampling is decided before any span is made (`Tracing.begin`): every span made is kept.
    provider = TracerProvider(resource=Resource.create(attributes), sampler=ParentBased(ALWAYS_ON))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint)))
    return Tracing(provider, config.sample_ratio)


class Tracing:
    """One process's tracer: the sampling decision, W3C propagation, spans of requests."""

    def __init__(self, provider: TracerProvider, sample_ratio: float) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("budrt")
        self.sample_ratio = sample_ratio
        self.propagator = TraceContextTextMapPropagator()
        self.in_context = trace.set_span_in_context
        self.server, self.client = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
        self.error = trace.Status(trace.StatusCode.ERROR)

    def begin(
        self, method: str, path: str, request_id: str, traceparent: bytes | None, tracestate: bytes | None
    ) -> RequestTrace:
        """A request's trace, sampled as its caller decided (a valid `traceparent`), else by
        `sample_ratio`; its span is this process's SERVER span of the request."""
        parent = _parse(traceparent)
        if parent is None:
            if random.random() >= self.sample_ratio:
                return RequestTrace(self, None, random.getrandbits(128) or 1, None)
            context = None
        elif not parent.sampled:  # the caller's decision travels on unchanged
            return RequestTrace(self, None, parent.trace_id, parent.header)
        else:
            carrier = {"traceparent": parent.header}
            if tracestate:
                carrier["tracestate"] = tracestate.decode("latin-1")
            context = self.propagator.extract(carrier)
        attributes = {"http.request.method": method, "url.path": path, "budrt.request_id": request_id}
        span = self.tracer.start_span(f"{method} {path}", context, self.server, attributes)
        return RequestTrace(self, span, span.get_span_context().trace_id, None)

    def shutdown(self) -> None:
        """Export what is still queued, then stop (also done at exit)."""
        self.provider.shutdown()


class _Parent(NamedTuple):
    trace_id: int
    sampled: bool
    header: str


def _parse(header: bytes | None) -> _Parent | None:
    """A valid `traceparent`, else None (the request starts a new trace)."""
    match = _TRACEPARENT.fullmatch(header) if header else None
    if match is None or match[1] == b"ff":
        return None
    trace_id = int(match[2], 16)
    if not trace_id or not int(match[3], 16):
        return None
    return _Parent(trace_id, bool(int(match[4], 16) & 1), match[0].decode("ascii"))


class Phases(Protocol):
    """What the gateway's request path steps through (auth, routing, limits...): a request's
    `RequestTrace`, or `UNTRACED` with tracing off, so that path never asks which."""

    def step(self, name: str | None) -> None: ...


class _Untraced:
    __slots__ = ()

    def step(self, name: str | None) -> None:
        pass


UNTRACED: Phases = _Untraced()


class RequestTrace:
    """One request's trace in this process. `span` is None when it is not sampled: nothing is
    recorded then, and every method but `headers` does nothing."""

    __slots__ = ("tracing", "span", "trace_id", "_header", "_context", "_phase", "_phase_start")

    def __init__(self, tracing: Tracing, span: Span | None, trace_id: int, header: str | None) -> None:
        self.tracing = tracing
        self.span = span
        self.trace_id = trace_id
        self._header = header  # an unsampled request's `traceparent`, passed on as it is
        self._context = tracing.in_context(span) if span is not None else None
        self._phase: str | None = None
        self._phase_start = 0

    @property
    def sampled(self) -> bool:
        return self.span is not None

    def headers(self, span: Span | None = None) -> dict[str, str]:
        """The trace context for a call made under `span` (else under the request's span)."""
        span = span or self.span
        if span is None:
            if self._header is None:  # no caller's header: our own, with a parent id of our own
                self._header = f"00-{self.trace_id:032x}-{random.getrandbits(64) or 1:016x}-00"
            return {"traceparent": self._header}
        ctx = span.get_span_context()
        out = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
        if ctx.trace_state:
            out["tracestate"] = ctx.trace_state.to_header()
        return out

    def set(self, name: str, value: str | int | float | bool) -> None:
        """An attribute of the request's span."""
        if self.span is not None:
            self.span.set_attribute(name, value)

    def step(self, name: str | None) -> None:
        """Ends the phase running (a child span from its start to now), then starts `name`
        (None: no phase runs until the next step)."""
        if self.span is None:
            return
        now = time.time_ns()
        if self._phase is not None:
            self.record(self._phase, self._phase_start, now)
        self._phase, self._phase_start = name, now

    def record(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Attributes | None = None,
        failed: bool = False,
    ) -> None:
        """A child span that is over already, with its times (`time.time_ns()`)."""
        if self.span is None:
            return
        span = self.tracing.tracer.start_span(name, self._context, attributes=attributes, start_time=start_ns)
        if failed:
            span.set_status(self.tracing.error)
        span.end(end_ns)

    def open(self, name: str, attributes: Attributes) -> Span:
        """A CLIENT child span (a call to another process) of a `sampled` trace, open until `close`."""
        return self.tracing.tracer.start_span(name, self._context, self.tracing.client, attributes)

    def close(self, span: Span, attributes: Attributes, failed: bool) -> None:
        span.set_attributes(attributes)
        if failed:
            span.set_status(self.tracing.error)
        span.end()

    def end(self, status: int) -> None:
        """Ends the request's span with its response's status: a 5xx is an error. The phase still
        running is the one that refused the request (a 401 in auth, a 429 in limits): it ends as
        an error too. Once ended, nothing more is recorded."""
        if self.span is None:
            return
        now = time.time_ns()
        if self._phase is not None:
            status_of = {"http.response.status_code": status}
            self.record(self._phase, self._phase_start, now, status_of, failed=status >= 400)
            self._phase = None
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(self.tracing.error)
        self.span.end(now)
        self.span = None


@dataclass(slots=True)
class RequestScope:
    """What the code handling a request, its log lines and its calls upstream know of it."""

    request_id: str
    trace: RequestTrace | None = None  # None: tracing is off (or the request is not traced)

    def upstream_headers(self, span: Span | None = None) -> dict[str, str]:
        """Headers of a call to an upstream made for this request (under `span`, if traced)."""
        headers = {"x-request-id": self.request_id}
        if self.trace is not None:
            headers.update(self.trace.headers(span))
        return headers

    @property
    def trace_id(self) -> str | None:
        return f"{self.trace.trace_id:032x}" if self.trace is not None else None


_CURRENT: ContextVar[RequestScope | None] = ContextVar("budrt_request", default=None)


def begin_request(
    headers: list[tuple[bytes, bytes]],
    tracing: Tracing | None,
    method: str,
    path: str,
    request_id: str | None = None,
) -> RequestScope:
    """A request's scope from its raw ASGI headers: its id (`request_id`, else the caller's if it
    is a plain token, else a new one) and, with `tracing`, its trace."""
    given = parent = state = None
    for name, value in headers:  # one pass over the headers for all three
        if name == REQUEST_ID_HEADER:
            given = value
        elif name == b"traceparent":
            parent = value
        elif name == b"tracestate":
            state = value
    if request_id is None:
        if given is not None and _REQUEST_ID.fullmatch(given) is not None:
            request_id = given.decode("ascii")
        else:  # unique, not secret: the process's random generator is cheaper than the OS's
            request_id = f"{random.getrandbits(128):032x}"
    trace = tracing.begin(method, path, request_id, parent, state) if tracing is not None else None
    return RequestScope(request_id, trace)


def enter_request(scope: RequestScope) -> Token[RequestScope | None]:
    """Makes `scope` the current request's (this task's, and the tasks it starts) until `leave_request`."""
    return _CURRENT.set(scope)


def leave_request(token: Token[RequestScope | None]) -> None:
    _CURRENT.reset(token)


def current_request() -> RequestScope | None:
    return _CURRENT.get()


def current_trace() -> RequestTrace | None:
    """The current request's trace when it is sampled (spans would be recorded), else None."""
    scope = _CURRENT.get()
    trace = scope.trace if scope is not None else None
    return trace if trace is not None and trace.span is not None else None


AsgiSend = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def sending_request_id(
    send: AsgiSend, request_id: str, on_status: Callable[[int], None] | None = None
) -> AsgiSend:
    """`send`, with `x-request-id` set on the response's start (whose status goes to `on_status`)."""

    async def answer(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if on_status is not None:
                on_status(message["status"])
            headers = list(message.get("headers", []))
            stamp_request_id(headers, request_id)
            message["headers"] = headers
        await send(message)

    return answer


def stamp_request_id(headers: list[tuple[bytes, bytes]], request_id: str) -> None:
    """Sets `x-request-id` in a response's raw headers, replacing one an upstream sent."""
    value = request_id.encode("ascii")
    for i, (name, _) in enumerate(headers):
        if name == REQUEST_ID_HEADER:
            headers[i] = (name, value)
            return
    headers.append((REQUEST_ID_HEADER, value))
