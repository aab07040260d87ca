"""The OpenAI API through the gateway, driven by the official `openai` SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess

import httpx
import numpy as np
import openai
import pytest

from tests.e2e.conftest import BUDRT, Platform
from tests.sse import sse_data

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {CHAT, EMBED} <= ids
    assert client.models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=CHAT, messages=FRANCE, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_alias_routes_to_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=5)
    assert r.choices[0].message.content


def test_stream_equals_non_stream_and_usage(client: openai.OpenAI) -> None:
    args = dict(
        model=CHAT,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        temperature=0,
        max_completion_tokens=40,
    )
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_raw_sse_ends_with_done(platform: Platform) -> None:
    body = {"model": CHAT, "messages": FRANCE, "max_tokens": 5, "stream": True}
    headers = {"Authorization": f"Bearer {platform.admin_key}"}
    with httpx.stream(
        "POST", f"{platform.base_url}/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_data(r))
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_usage_counts_are_exact(client: openai.OpenAI) -> None:
    prompt_ids = [504, 3458, 314, 253, 1117, 28]
    r = client.completions.create(
        model=CHAT,
        prompt=prompt_ids,
        max_tokens=7,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 7 == len(r.choices[0].logprobs.tokens)
    assert r.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(
        model=CHAT, messages=FRANCE, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    assert chat.usage.completion_tokens == len(chat.choices[0].logprobs.content)
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)


def test_sampling_parameters(client: openai.OpenAI) -> None:
    base = dict(model=CHAT, messages=[{"role": "user", "content": "Tell me a short story."}])
    a = client.chat.completions.create(**base, max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, user="t")
    b = client.chat.completions.create(**base, max_tokens=20, temperature=1.0, top_p=0.9, seed=1234)
    assert a.choices[0].message.content == b.choices[0].message.content
    n = client.chat.completions.create(**base, max_tokens=20, temperature=1.0, n=3, seed=7, logprobs=True)
    assert [c.index for c in n.choices] == [0, 1, 2]
    assert len({c.message.content for c in n.choices}) > 1  # n samples, not one answer three times
    assert n.usage.completion_tokens == sum(len(c.logprobs.content) for c in n.choices)
    limited = client.chat.completions.create(**base, temperature=0, max_tokens=3)
    assert limited.choices[0].finish_reason == "length" and limited.usage.completion_tokens == 3


def test_stop_strings_are_not_returned(client: openai.OpenAI) -> None:
    args = dict(
        model=CHAT,
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        temperature=0,
        max_tokens=40,
    )
    full = client.chat.completions.create(**args).choices[0].message.content
    assert "4" in full, full
    stopped = client.chat.completions.create(**args, stop=["4"])
    text = stopped.choices[0].message.content
    assert "4" not in text and stopped.choices[0].finish_reason == "stop"
    assert full.startswith(text)


def test_completions_prompt_list_and_stream(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=CHAT, prompt=["The capital of France is", "One, two,"], max_tokens=5, temperature=0
    )
    assert len(r.choices) == 2 and all(c.text for c in r.choices)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=CHAT, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_embeddings(client: openai.OpenAI) -> None:
    texts = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    ]
    r = client.embeddings.create(model=EMBED, input=texts)
    vectors = np.array([d.embedding for d in r.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    single = client.embeddings.create(model=EMBED, input=texts[0], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(single.data[0].embedding), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-5)
    default = client.embeddings.create(model=EMBED, input=texts[0])  # the SDK asks base64, decodes it
    assert np.allclose(np.array(default.data[0].embedding), vectors[0], atol=1e-5)
    assert r.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBED, input="hello", dimensions=64)
    assert err.value.body["param"] == "dimensions"


def test_error_unknown_model_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=FRANCE)
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"


def test_error_invalid_body_400_names_param(client: openai.OpenAI, platform: Platform) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT, messages=FRANCE, temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT, messages=[])
    assert err.value.body["param"] == "messages"
    headers = {"Authorization": f"Bearer {platform.admin_key}", "Content-Type": "application/json"}
    bad = httpx.post(f"{platform.base_url}/chat/completions", content=b"{not json", headers=headers)
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


def test_error_auth_401(platform: Platform) -> None:
    from openai import OpenAI

    wrong = OpenAI(base_url=platform.base_url, api_key="budrt-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.post(f"{platform.base_url}/chat/completions", json={"model": CHAT, "messages": FRANCE})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"


def test_error_context_too_long_400(client: openai.OpenAI) -> None:
    long_text = "hello " * 3000
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": long_text}])
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT, messages=FRANCE, max_tokens=5000)


def test_overload_503_with_retry_after(platform: Platform) -> None:
    # The test config allows 8 running + 8 waiting sequences; 40 at once must overflow.
    headers = {"Authorization": f"Bearer {platform.admin_key}"}
    body = {"model": CHAT, "messages": FRANCE, "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(
                *[
                    c.post(f"{platform.base_url}/chat/completions", json=body, headers=headers)
                    for _ in range(40)
                ]
            )

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) >= 8, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "service_unavailable"


def test_keys_create_cli(platform: Platform) -> None:
    out = subprocess.run(
        [BUDRT, "keys", "create", "--name", "ci", "--json", "--home", str(platform.home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    key = json.loads(out.stdout)["key"]
    assert key.startswith("budrt-")
    r = httpx.get(f"{platform.base_url}/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    admin_file = platform.home / "admin.key"
    assert admin_file.read_text().strip() == platform.admin_key
    assert admin_file.stat().st_mode & 0o777 == 0o600
    assert platform.admin_key.encode() not in (platform.home / "budrt.db").read_bytes()


def test_health_and_metrics(platform: Platform) -> None:
    assert httpx.get(f"{platform.root_url}/health/live").status_code == 200
    assert httpx.get(f"{platform.root_url}/health/ready").status_code == 200
    metrics = httpx.get(f"{platform.root_url}/metrics")
    assert metrics.status_code == 200 and "# TYPE" in metrics.text
    # Model servers show theirs only to holders of the run's internal credential.
    internal = (platform.home / "run" / "internal.key").read_text()
    for proc in platform.status()["processes"]:
        if proc["kind"] == "model-server":
            assert httpx.get(f"{proc['url']}/metrics").status_code == 401
        auth = {"Authorization": f"Bearer {internal}"}
        server_metrics = httpx.get(f"{proc['url']}/metrics", headers=auth).text
        assert "# TYPE" in server_metrics
        if proc["kind"] == "model-server" and CHAT in proc["models"]:
            assert "budrt:num_requests_running" in server_metrics
            assert "budrt:generation_tokens_total" in server_metrics
