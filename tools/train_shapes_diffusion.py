"""Train `shapes-diffusion`, the demo text-to-image model, on procedurally drawn captioned scenes.

    .venv/bin/python tools/train_shapes_diffusion.py --minutes 40 --seed 0

Scenes come from `budrt.image.shapes` (its held-out tenth of captions is never drawn here). The
captions' MiniLM states are computed once; each step draws a fresh batch, noises it at random
timesteps and fits the UNet's output to v = sqrt(a) noise - sqrt(1 - a) picture (v-prediction:
the picture itself at high noise, the noise at low; cosine schedule), with the caption
dropped one time in ten so that classifier-free guidance works. An exponential moving average of
the weights is what gets saved, as fp16, into a diffusers pipeline directory.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from budrt.image import shapes
from budrt.image.shapes_pipeline import ShapesDiffusionPipeline
from budrt.observe.logging import setup_logging
from budrt.observe.progress import NO_PROGRESS, LogReporter, ProgressReporter

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/budrt/image/weights/shapes-diffusion"


def make_unet(patch: int, text_width: int) -> UNet2DConditionModel:
    channels = 3 * patch * patch
    return UNet2DConditionModel(
        sample_size=shapes.SIZE // patch,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_schedulers() -> tuple[DDPMScheduler, DDIMScheduler]:
    """(the training noise schedule, the sampler saved with the model: DDIM over the same betas)."""
    train = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    sample = DDIMScheduler.from_config(train.config, clip_sample=True, timestep_spacing="trailing")
    return train, sample


def batch_pixels(scenes: list[shapes.Scene], rng: random.Random) -> torch.Tensor:
    arrays = np.stack([np.asarray(shapes.draw(s, rng)) for s in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save(pipe: ShapesDiffusionPipeline, ema: UNet2DConditionModel, out: Path) -> None:
    half = copy.deepcopy(ema).to(torch.float16)
    pipe.register_modules(unet=half)
    pipe.save_pretrained(out)


def expected_steps(step: int, elapsed_s: float, args: argparse.Namespace) -> int:
    """The steps this run will have made when it stops: `--steps`, or fewer if `--minutes` runs
    out first at the pace so far (the bar's total)."""
    if step == 0 or elapsed_s <= 0:
        return args.steps
    return max(step, min(args.steps, int(step * args.minutes * 60 / elapsed_s)))


def train(args: argparse.Namespace, progress: ProgressReporter = NO_PROGRESS) -> None:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    torch.set_num_threads(args.threads)
    train_scenes, _ = shapes.split_scenes()
    noise_schedule, sampler = make_schedulers()
    unet = make_unet(args.patch, 384)
    if args.init is not None:  # go on from saved weights (their EMA; the optimizer starts afresh)
        saved = UNet2DConditionModel.from_pretrained(args.init / "unet", dtype=torch.float32)
        unet.load_state_dict(saved.state_dict())
    pipe = ShapesDiffusionPipeline(unet=unet, scheduler=sampler, patch=args.patch)
    captions = [s.caption() for s in train_scenes]
    states = torch.cat([pipe.prompt_encoder(captions[i : i + 128]) for i in range(0, len(captions), 128)])
    empty = pipe.prompt_encoder([""])
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    alphas = noise_schedule.alphas_cumprod
    started, step = time.monotonic(), 0
    while step < args.steps and time.monotonic() - started < args.minutes * 60:
        picks = [rng.randrange(len(train_scenes)) for _ in range(args.batch)]
        x0 = pipe.encode_pixels(batch_pixels([train_scenes[i] for i in picks], rng))
        cond = states[picks].clone()
        cond[torch.rand(args.batch) < 0.1] = empty[0]
        t = torch.randint(0, 1000, (args.batch,))
        if args.low_t_share:  # more of the last steps, where the fine grain is removed
            low = torch.rand(args.batch) < args.low_t_share
            t[low] = torch.randint(0, 200, (int(low.sum()),))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v: x0 at high noise, the noise at low
        lr = args.lr * min(1.0, (step + 1) / 200)  # warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        loss = torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        step += 1
        elapsed = time.monotonic() - started
        progress.report("train", step, expected_steps(step, elapsed, args))
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.monotonic() - started:.0f}s", flush=True)
        if step % args.save_every == 0:
            save(pipe, ema, args.out)
    progress.report("train", step, step)  # stopped: by steps or by time
    save(pipe, ema, args.out)
    print(f"saved {args.out} after {step} steps, {time.monotonic() - started:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--init", type=Path, default=None, help="a saved pipeline to start from")
    parser.add_argument("--low-t-share", type=float, default=0.0, help="share of timesteps drawn below 200")
    # Logs and a progress bar on a terminal (JSON lines otherwise), as `budrt serve` shows them.
    setup_logging("train", "info", "auto")
    progress = LogReporter("shapes-diffusion")
    try:
        train(parser.parse_args(), progress)
    finally:
        progress.end()


if __name__ == "__main__":
    main()
