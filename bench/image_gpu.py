"""Image serving on a GPU: the diffusion engine against the pipeline called one request at a time,
on a Stable Diffusion 1.5-shaped pipeline with random weights (no model hub on the lent machines).

    PYTHONPATH=src:. python bench/image_gpu.py --device cuda --json out.json    # bench/gpu.sh runs it
    PYTHONPATH=src:. python bench/image_gpu.py --device cpu --tiny               # a smoke test anywhere

SD 1.5's UNet (860 M parameters), VAE and CLIP text encoder shapes, PNDM, 512x512, in the
device's dtype ("auto": bf16 or fp16); `--requests` prompts at 20 or 30 steps taken by `--clients`
closed-loop clients two ways: `direct`, the pipeline's own `__call__` under a lock, and `engine`,
jobs submitted to `DiffusionEngine` (step-level batching, in process: no HTTP on the GPU image).
Then one request alone, both ways. Prints JSON: images/s, p50/p95, the ratios, the device.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_serving import Request, alone, closed_loop, run_direct  # noqa: E402

from budrt.config import ModelConfig  # noqa: E402
from budrt.engine import openmp  # noqa: E402
from budrt.image.denoiser import Denoiser  # noqa: E402
from budrt.image.engine import DiffusionEngine, ImageJob, image_dtype  # noqa: E402
from tests.tiny_diffusers import build_tiny_sd, clip_tokenizer, sd_scheduler  # noqa: E402

WORDS = "red blue green circle square triangle large small top bottom left right center".split()


def sd15_shaped(device: torch.device, dtype: torch.dtype) -> Any:
    """StableDiffusionPipeline with SD 1.5's component shapes and random weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the rest: SD 1.x's defaults
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
            scaling_factor=0.18215,
        )
        config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
        )
        text_encoder = CLIPTextModel(config).eval()
    tokenizer = clip_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")  # a small vocabulary: ids < 100
    pipe = StableDiffusionPipeline(
        vae, text_encoder, tokenizer, unet, sd_scheduler(), None, None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def tiny(device: torch.device, dtype: torch.dtype) -> Any:
    from budrt.image.denoiser import load_pipeline

    pipe = load_pipeline(build_tiny_sd(Path(tempfile.mkdtemp()) / "sd"), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def workload(count: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [
        {"prompt": " ".join(rng.sample(WORDS, 5)), "steps": rng.choice((20, 30)), "n": 1}
        for _ in range(count)
    ]


def engine_serve(engine: DiffusionEngine, size: int) -> Any:
    def serve(request: Request) -> None:
        cond, uncond = engine.denoiser.encode([request["prompt"]], [""])
        job = ImageJob(
            size, size, cond, uncond, engine.denoiser.default_guidance, request["steps"], torch.Generator()
        )
        engine.submit([job])
        job.result.result(timeout=600)

    return serve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--alone", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny random SD 1.x at 32x32 (a smoke test)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = image_dtype(ModelConfig(name="x", task="image", format="diffusers", source="."), device)
    pipe = (tiny if args.tiny else sd15_shaped)(device, dtype)
    size = 32 if args.tiny else 512
    engine = DiffusionEngine(Denoiser(pipe), max_batch_images=args.clients)
    engine.start()
    requests = workload(args.requests, 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {"command": " ".join(["bench/image_gpu.py", *sys.argv[1:]]), "device": name}
    report |= {
        "dtype": str(dtype),
        "size": size,
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
    }
    call = {"height": size, "width": size}
    report["direct"] = run_direct(
        openmp.released(lambda p, **kw: pipe(p, **kw, **call)), requests, args.clients
    )
    report["engine"] = closed_loop(requests, args.clients, engine_serve(engine, size))
    one = {"prompt": requests[0]["prompt"], "steps": 20, "n": 1}
    bare_s = alone(openmp.released(lambda: pipe(one["prompt"], num_inference_steps=20, **call)), args.alone)
    engine_s = alone(lambda: engine_serve(engine, size)(one), args.alone)
    engine.stop()
    report["alone"] = {"bare_pipeline_s": round(bare_s, 4), "engine_s": round(engine_s, 4)}
    report["ratios"] = {
        "engine_vs_direct_images_per_s": round(
            report["engine"]["images_per_s"] / report["direct"]["images_per_s"], 2
        ),
        "alone_engine_vs_bare": round(engine_s / bare_s, 3),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
