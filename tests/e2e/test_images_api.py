"""Images through `budrt serve` with the official `openai` SDK: generate (b64_json and signed URLs
fetched without a key), streaming, edits, errors, image budgets and each built-in role."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from tests.e2e.conftest import Platform

MODEL = "shapes-diffusion"
PROMPT = "one large red circle on a white background, center"


def _picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _key(platform: Platform, **body: object) -> str:
    headers = {"Authorization": f"Bearer {platform.admin_key}"}
    r = httpx.post(
        f"{platform.root_url}/admin/keys", json={"name": "img", **body}, headers=headers, timeout=10
    )
    assert r.status_code == 201, r.text
    return r.json()["key"]


def _client(platform: Platform, key: str) -> OpenAI:
    return OpenAI(base_url=platform.base_url, api_key=key, max_retries=0, timeout=120)


def test_generate_b64_json_with_the_sdks_extras(client: OpenAI) -> None:
    result = client.images.generate(
        model=MODEL,
        prompt=PROMPT,
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 11, "steps": 6, "guidance_scale": 3.0, "negative_prompt": "blue"},
    )
    assert len(result.data) == 2
    pictures = [_picture(base64.b64decode(d.b64_json or "")) for d in result.data]
    assert all(p.format == "PNG" and p.size == (64, 64) for p in pictures)
    again = client.images.generate(
        model=MODEL,
        prompt=PROMPT,
        n=2,
        response_format="b64_json",
        extra_body={"seed": 11, "steps": 6, "guidance_scale": 3.0, "negative_prompt": "blue"},
    )
    assert [d.b64_json for d in again.data] == [d.b64_json for d in result.data]


def test_url_response_is_fetched_without_a_key_and_a_changed_signature_is_refused(client: OpenAI) -> None:
    result = client.images.generate(
        model=MODEL, prompt=PROMPT, response_format="url", extra_body={"steps": 4}
    )
    url = result.data[0].url
    assert url is not None and "sig=" in url and "expires=" in url
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert _picture(fetched.content).size == (64, 64)
    sig = url.split("sig=")[1].split("&")[0]
    tampered = url.replace("sig=" + sig, "sig=" + ("A" if sig[0] != "A" else "B") + sig[1:])
    assert httpx.get(tampered, timeout=10).status_code == 403


def test_streaming_through_the_sdk(client: OpenAI) -> None:
    stream = client.images.generate(
        model=MODEL, prompt=PROMPT, stream=True, partial_images=2, extra_body={"steps": 6}
    )
    kinds = [event.type for event in stream]
    assert kinds.count("image_generation.partial_image") == 2
    assert kinds[-1] == "image_generation.completed"


def test_edit_keeps_what_the_mask_protects(client: OpenAI) -> None:
    source = Image.new("RGB", (64, 64), (250, 250, 250))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 64, 32))  # repaint the top half
    files = []
    for image in (source, mask):
        data = io.BytesIO()
        image.save(data, "PNG")
        files.append(("in.png", data.getvalue(), "image/png"))
    result = client.images.edit(
        model=MODEL,
        image=files[0],
        mask=files[1],
        prompt=PROMPT,
        response_format="b64_json",
        extra_body={"steps": 4},
    )
    out = _picture(base64.b64decode(result.data[0].b64_json or "")).convert("RGB")
    assert out.crop((0, 32, 64, 64)).tobytes() == source.crop((0, 32, 64, 64)).tobytes()


def test_errors_name_the_param(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model=MODEL, prompt=PROMPT, size="1024x1024")
    assert err.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model=MODEL, prompt="")
    assert err.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model=MODEL, prompt=PROMPT, n=50)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="smollm2-135m-instruct", prompt=PROMPT)
    assert err.value.body["param"] == "model"


def test_image_budget_counts_n(platform: Platform) -> None:
    sdk = _client(platform, _key(platform, images_per_day=3))
    sdk.images.generate(model=MODEL, prompt=PROMPT, n=2, response_format="b64_json", extra_body={"steps": 2})
    with pytest.raises(openai.RateLimitError) as err:
        sdk.images.generate(
            model=MODEL, prompt=PROMPT, n=2, response_format="b64_json", extra_body={"steps": 2}
        )
    assert err.value.body["code"] == "insufficient_quota"
    sdk.images.generate(model=MODEL, prompt=PROMPT, n=1, response_format="b64_json", extra_body={"steps": 2})


@pytest.mark.parametrize(("role", "allowed"), [("admin", True), ("developer", True), ("viewer", False)])
def test_each_built_in_role_on_image_generation(platform: Platform, role: str, allowed: bool) -> None:
    sdk = _client(platform, _key(platform, role=role))
    if allowed:
        result = sdk.images.generate(
            model=MODEL, prompt=PROMPT, response_format="b64_json", extra_body={"steps": 2}
        )
        assert result.data[0].b64_json
    else:
        with pytest.raises(openai.PermissionDeniedError):
            sdk.images.generate(
                model=MODEL, prompt=PROMPT, response_format="b64_json", extra_body={"steps": 2}
            )


def test_a_key_limited_to_other_models_cannot_see_the_image_model(platform: Platform) -> None:
    sdk = _client(platform, _key(platform, models=["smollm2-135m-instruct"]))
    with pytest.raises(openai.NotFoundError):
        sdk.images.generate(model=MODEL, prompt=PROMPT, extra_body={"steps": 2})
