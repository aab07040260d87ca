"""Load on demand, one load for many waiters, LRU eviction under a memory budget, pinning (a real server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from budrt.config import ModelConfig
from budrt.server.cost import estimate_cost
from tests.sse import sse_data
from tests.tiny_models import build_tiny_llama, start_server, tiny_config

NAMES = ["tiny-a", "tiny-b", "tiny-c"]
KV_BYTES = 8 << 20  # = tiny_config's


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> list[ModelConfig]:
    root = tmp_path_factory.mktemp("tiny")
    return [tiny_config(name, build_tiny_llama(root / name, seed=i)) for i, name in enumerate(NAMES)]


@pytest.fixture(scope="module")
def server(tiny_models: list[ModelConfig], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cost = estimate_cost(tiny_models[0], Path(tiny_models[0].source))
    home = tmp_path_factory.mktemp("home")
    big = tiny_models[0].model_copy(update={"name": "too-big", "memory_bytes": cost * 4})
    # Pinned (so preloaded, and never evicted although it is never used: always the LRU one).
    pinned = tiny_models[0].model_copy(update={"name": "tiny-pinned", "pinned": True})
    models = [*tiny_models, big, pinned]
    proc, url = start_server(home, models, memory_budget_bytes=int(cost * 3.5), self_test_interval_s=0)
    yield url
    proc.terminate()
    proc.wait(timeout=15)


def states(url: str) -> dict[str, dict]:
    data = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {m["id"]: m for m in data}


def chat(url: str, model: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_models_start_available_and_concurrent_first_requests_share_one_load(server: str) -> None:
    now = states(server)
    assert now.pop("tiny-pinned")["state"] == "resident"
    assert {m["state"] for m in now.values()} == {"available"}

    async def burst() -> list[httpx.Response]:
        # ignore_eos: a random model may sample its EOS token at any step.
        body = {
            "model": "tiny-a",
            "max_tokens": 3,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "hello"}],
        }
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(client.post(f"{server}/v1/chat/completions", json=body) for _ in range(20))
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 20, responses[0].text
    assert all(r.json()["usage"]["completion_tokens"] == 3 for r in responses)
    card = states(server)["tiny-a"]
    assert card["state"] == "resident" and card["loads"] == 1 and card["in_flight"] == 0
    assert card["memory_bytes"] > KV_BYTES


def test_budget_for_two_evicts_the_least_recently_used(server: str) -> None:
    for name in NAMES:  # a (resident from before), b, c: c's load evicts a
        assert chat(server, name).status_code == 200
    now = states(server)
    assert [now[n]["state"] for n in NAMES] == ["available", "resident", "resident"]
    ready = {n: httpx.get(f"{server}/health/ready", params={"model": n}).status_code for n in NAMES}
    assert ready == {"tiny-a": 503, "tiny-b": 200, "tiny-c": 200}
    assert chat(server, "tiny-b").status_code == 200  # b is now more recent than c
    assert chat(server, "tiny-a").status_code == 200  # a comes back, c (LRU) goes
    now = states(server)
    assert [now[n]["state"] for n in NAMES] == ["resident", "resident", "available"]
    assert now["tiny-a"]["loads"] == 2
    assert now["tiny-pinned"]["state"] == "resident" and now["tiny-pinned"]["loads"] == 1


def test_a_model_with_an_active_stream_is_not_evicted(server: str) -> None:
    # Resident now: a and b, b the more recent. Stream from a (the LRU), then load c: without the
    # stream a would go; with it, b must.
    body = {
        "model": "tiny-a",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
        "messages": [{"role": "user", "content": "a long story"}],
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{server}/v1/chat/completions", json=body) as stream,
    ):
        assert stream.status_code == 200
        events = sse_data(stream)
        assert next(events)
        assert states(server)["tiny-a"]["in_flight"] == 1
        assert chat(server, "tiny-c").status_code == 200
        chunks = [orjson.loads(data) for data in events if data.startswith("{")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    now = states(server)
    assert [now[n]["state"] for n in NAMES] == ["resident", "available", "resident"]


def test_a_model_that_can_never_fit_is_refused_clearly(server: str) -> None:
    response = chat(server, "too-big")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_too_large" and "can never be loaded" in error["message"]
    now = states(server)
    assert now["too-big"]["state"] == "failed"
    assert now["tiny-a"]["state"] == "resident"  # nothing was evicted for it


def test_a_load_slower_than_the_timeout_answers_503_with_retry_after(tiny_models: list[ModelConfig]) -> None:
    from budrt.protocol.errors import APIError
    from budrt.server.model_pool import ModelPool

    async def scenario() -> None:
        def slow_fetch(cfg: ModelConfig, progress: object) -> ModelConfig:  # e.g. still downloading
            time.sleep(1.0)
            return cfg

        pool = ModelPool([tiny_models[0]], load_timeout_s=0.2, resolver=slow_fetch)
        with pytest.raises(APIError) as caught:
            await pool.acquire("tiny-a", "chat")
        assert caught.value.status == 503 and caught.value.headers.get("Retry-After")
        assert pool.models["tiny-a"].state == "loading"  # the load goes on for the next request
        await pool.models["tiny-a"].load_task  # type: ignore[misc]
        hosted = await pool.acquire("tiny-a", "chat")
        assert hosted.state == "ready" and hosted.loads == 1
        pool.release(hosted)
        await pool.close()

    asyncio.run(scenario())
