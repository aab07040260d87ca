"""Traces and request ids (observe/tracing.py): a gateway in process with the SDK's in-memory
exporter; a gateway and a model server as processes exporting over OTLP/HTTP to a receiver
here (OTLP's protobuf decoded with opentelemetry-proto); the request id and trace id in the
JSON log lines of a request."""

from __future__ import annotations

import gzip
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from budrt.config import DeploymentConfig, Settings, TracingConfig
from budrt.gateway.app import create_app
from budrt.observe.logging import JsonFormatter
from budrt.observe.tracing import setup_tracing
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.gateway.identity import CHAT, chat
from tests.mock_upstream import MockUpstream, ServerThread, free_port
from tests.procs import start_gateway, stop
from tests.tiny_models import build_tiny_llama, start_server, tiny_config

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def sampled(flags: str) -> bool:
    return bool(int(flags, 16) & 1)  # bit 1 (0x02) says the trace id is random (W3C level 2)


def wait_for(found: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """`found()` once it is truthy (spans are exported after the response is sent)."""
    deadline = time.monotonic() + timeout
    while not (result := found()):
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)
    return result


def test_the_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(ValidationError, match="tracing.endpoint"):
        TracingConfig(enabled=True, endpoint="collector:4318")
    with pytest.raises(ValidationError):
        TracingConfig(sample_ratio=1.5)
    assert not TracingConfig().enabled  # off by default


# -- a gateway in this process --


@dataclass
class Traced:
    url: str
    key: str
    upstream: MockUpstream
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def roots(self, status: int | None = None) -> list[ReadableSpan]:
        """The requests' SERVER spans (of those answered `status`), which end after their phases'."""
        return [
            s
            for s in self.spans()
            if s.kind is SpanKind.SERVER and (status is None or status_of(s) == status)
        ]

    def root(self) -> ReadableSpan:
        """The (one) request's SERVER span, once it has ended."""
        found = wait_for(self.roots, "request span")
        assert len(found) == 1, [s.name for s in found]
        return found[0]


def status_of(span: ReadableSpan) -> object:
    return (span.attributes or {}).get("http.response.status_code")


@contextmanager
def in_process(tmp_path: Path, tracing: TracingConfig, dead_url: str | None = None) -> Iterator[Traced]:
    upstream = MockUpstream("up")
    up = ServerThread(upstream.app).start()
    deployments = [DeploymentConfig(model="m1", endpoints=[up.url + "/v1"])]
    if dead_url is not None:  # nothing listens there: the attempt fails, and is logged
        deployments.append(DeploymentConfig(model="dead", endpoints=[dead_url]))
    settings = Settings(
        home=tmp_path,
        secret_key="test-secret-test-secret",
        deployments=deployments,
        gateway={"health_interval_s": 30, "connect_timeout_s": 1.0, "retries": 0},
    )
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    key, _ = store.create("k", rpm=1000, tpm=1_000_000)  # limits: the request has a `limits` phase
    exporter = InMemorySpanExporter()
    tracer = setup_tracing(tracing, "budrt-gateway", exporter)
    server = ServerThread(create_app(settings, key_store=store, tracing=tracer)).start()
    try:
        yield Traced(server.url, key, upstream, exporter)
    finally:
        server.stop()
        up.stop()
        store.db.dispose()
        if tracer is not None:
            tracer.shutdown()


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[Traced]:
    with in_process(tmp_path, TracingConfig(enabled=True), f"http://127.0.0.1:{free_port()}/v1") as gw:
        yield gw


def _post(gw: Traced, headers: dict[str, str] | None = None, model: str = "m1") -> httpx.Response:
    auth = {"Authorization": f"Bearer {gw.key}", **(headers or {})}
    return httpx.post(gw.url + CHAT, json=chat(model), headers=auth, timeout=10)


def test_one_request_is_one_trace_carried_upstream(traced: Traced) -> None:
    resp = _post(traced, {"x-request-id": "req-123"})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "req-123"
    root = traced.root()
    assert root.name == "POST /v1/chat/completions"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["budrt.request_id"] == "req-123" and root.attributes["budrt.model"] == "m1"
    children = {s.name: s for s in traced.spans() if s is not root}
    assert {"auth", "routing", "limits", "upstream"} <= children.keys()
    for span in children.values():
        assert span.context.trace_id == root.context.trace_id
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time
    attempt = children["upstream"]
    assert attempt.kind is SpanKind.CLIENT
    assert attempt.attributes["http.response.status_code"] == 200
    # The model server continues the trace under the attempt's span, and logs the same request id.
    sent = TRACEPARENT.fullmatch(traced.upstream.last_headers["traceparent"])
    assert sent is not None and sampled(sent[3])
    assert int(sent[1], 16) == root.context.trace_id and int(sent[2], 16) == attempt.context.span_id
    assert traced.upstream.last_headers["x-request-id"] == "req-123"


def test_request_ids_are_made_when_absent_or_unusable(traced: Traced) -> None:
    first, second = _post(traced), _post(traced, {"x-request-id": "x" * 200})
    made = [r.headers["x-request-id"] for r in (first, second)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", m) for m in made) and made[0] != made[1]
    # Every answer has one, also those that no upstream gave and the routes beside the proxy.
    refused = httpx.post(traced.url + CHAT, json=chat("m1"), headers={"x-request-id": "no-key"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "no-key"
    listed = httpx.get(traced.url + "/v1/models", headers={"x-request-id": "list-1"})
    assert listed.headers["x-request-id"] == "list-1"
    wait_for(lambda: traced.roots(401), "span of the 401")
    auth = [s for s in traced.spans() if status_of(s) == 401]
    assert {s.name for s in auth} == {"auth", "POST /v1/chat/completions"}  # the phase that refused it
    assert next(s for s in auth if s.name == "auth").status.is_ok is False


def test_a_callers_decision_is_kept(tmp_path: Path) -> None:
    """`sample_ratio` 0: nothing is traced of its own accord, and the model server is told so;
    a caller's sampled `traceparent` is traced all the same, in the caller's trace."""
    with in_process(tmp_path, TracingConfig(enabled=True, sample_ratio=0.0)) as gw:
        assert _post(gw).status_code == 200
        sent = TRACEPARENT.fullmatch(gw.upstream.last_headers["traceparent"])
        assert sent is not None and not sampled(sent[3])
        caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        assert _post(gw, {"traceparent": caller}).status_code == 200
        root = gw.root()
        assert f"{root.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
        assert root.parent is not None and f"{root.parent.span_id:016x}" == "b7ad6b7169203331"


def test_tracing_off_makes_no_spans_and_sends_no_traceparent(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    assert setup_tracing(TracingConfig(), "budrt-gateway", exporter) is None
    with in_process(tmp_path, TracingConfig()) as gw:
        resp = _post(gw, {"x-request-id": "plain"})
        assert resp.status_code == 200 and resp.headers["x-request-id"] == "plain"
        assert "traceparent" not in gw.upstream.last_headers
        assert gw.upstream.last_headers["x-request-id"] == "plain"
        assert gw.spans() == []


class Lines(logging.Handler):
    """The JSON lines a process would write, kept."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter("gateway"))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))


def test_log_lines_carry_the_request_and_trace_ids(traced: Traced) -> None:
    lines = Lines()
    logging.getLogger("budrt.gateway").addHandler(lines)
    try:
        resp = _post(traced, {"x-request-id": "logged-1"}, model="dead")
    finally:
        logging.getLogger("budrt.gateway").removeHandler(lines)
    assert resp.status_code == 503 and resp.headers["x-request-id"] == "logged-1"
    failed = [line for line in lines.lines if line["msg"] == "upstream attempt failed"]
    assert failed, lines.lines
    root = traced.root()
    assert failed[0]["request_id"] == "logged-1"
    assert failed[0]["trace_id"] == f"{root.context.trace_id:032x}"
    assert root.status.is_ok is False  # a 503


# -- a gateway and a model server as processes, exporting over OTLP/HTTP --


class Receiver:
    """An OTLP/HTTP traces endpoint: decodes each export, keeps its spans."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    one = {
                        "service": attrs.get("service.name"),
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(),
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                    }
                    with self.lock:
                        self.spans.append(one)

    def named(self, service: str, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["service"] == service and s["name"] == name]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


INTERNAL = "internal-key-for-tracing-tests"


def test_one_trace_from_the_gateway_into_the_model_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = Receiver()
    # Both processes take their settings from here, where the environment turns tracing on.
    monkeypatch.setenv("BUDRT_TRACING__ENABLED", "true")
    monkeypatch.setenv("BUDRT_TRACING__ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5 s
    model = tiny_config("tiny", build_tiny_llama(tmp_path / "model"))  # loads on its first request
    (tmp_path / "server").mkdir()
    server, server_url = start_server(
        tmp_path / "server", [model], internal_key=INTERNAL, self_test_interval_s=0
    )
    gateway = None
    try:
        settings = Settings(
            home=tmp_path / "gateway",
            secret_key="test-secret-test-secret",
            deployments=[DeploymentConfig(model="tiny", endpoints=[server_url + "/v1"], api_key=INTERNAL)],
            models=[],
            model_servers=[],
        )
        assert settings.tracing.enabled and settings.tracing.endpoint == receiver.url
        migrate(settings.database_url_resolved)
        store = KeyStore.from_settings(settings)
        key, _ = store.create("k")
        store.db.dispose()
        gateway, url = start_gateway(settings, tmp_path / "runtime.json")
        body = {**chat("tiny"), "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        resp = httpx.post(url + CHAT, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert resp.status_code == 200, resp.text
        trace_id = _check_one_trace(receiver)
        # The model server's log lines of the request (its model's load) carry the same ids.
        lines = [
            orjson.loads(line) for line in (tmp_path / "server" / "server.log").read_bytes().splitlines()
        ]
        (loaded,) = [line for line in lines if line["msg"].startswith("model tiny ready")]
        assert loaded["request_id"] == resp.headers["x-request-id"] and loaded["trace_id"] == trace_id
    finally:
        if gateway is not None:
            stop(gateway)
        stop(server)
        receiver.stop()


def _check_one_trace(receiver: Receiver) -> str:
    """The trace id of the one request's spans, checked to form one tree across both processes."""
    name = "POST /v1/chat/completions"
    (gw_root,) = wait_for(lambda: receiver.named("budrt-gateway", name), "gateway span")
    (attempt,) = wait_for(lambda: receiver.named("budrt-gateway", "upstream"), "attempt span")
    (server_root,) = wait_for(lambda: receiver.named("budrt-model-server", name), "model-server span")
    trace_id = gw_root["trace_id"]
    assert attempt["trace_id"] == server_root["trace_id"] == trace_id
    assert attempt["parent"] == gw_root["span_id"] and server_root["parent"] == attempt["span_id"]
    phases = {}
    for phase in ("model.load", "queue", "prefill", "decode"):
        (span,) = wait_for(lambda p=phase: receiver.named("budrt-model-server", p), phase)
        assert span["trace_id"] == trace_id and span["parent"] == server_root["span_id"]
        phases[phase] = span
    queue, prefill, decode = phases["queue"], phases["prefill"], phases["decode"]
    assert (
        queue["start"]
        <= queue["end"]
        == prefill["start"]
        <= prefill["end"]
        == decode["start"]
        <= decode["end"]
    )
    return trace_id
