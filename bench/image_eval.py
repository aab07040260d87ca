"""How often `shapes-diffusion` draws what its caption says, read back from the pixels.

    .venv/bin/python bench/image_eval.py --per-caption 4 --grid docs/images/shapes-eval.png
    .venv/bin/python bench/image_eval.py --guidance 1 1.5 2 4     # a sweep (the grid: the last)

Captions of the held-out tenth of the procedural world (`budrt.image.shapes.split_scenes`: never
drawn in training) and as many training captions are generated `--per-caption` times each (seeds
0, 1, ...), through the model server's engine; `shapes.read_scene` reads shape, color, size,
count, position and background from every picture. Prints the share right per attribute and
overall, as JSON with the CPU, and saves a grid of held-out pictures beside their captions.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import cpu_summary  # noqa: E402

from budrt.config import Settings  # noqa: E402
from budrt.image import shapes  # noqa: E402
from budrt.image.engine import DiffusionEngine, ImageJob, start_engine  # noqa: E402


def generate(
    engine: DiffusionEngine, scenes: list[shapes.Scene], per: int, steps: int, guidance: float
) -> list[np.ndarray]:
    jobs = []
    for scene in scenes:
        cond, uncond = engine.denoiser.encode([scene.caption()], [""])
        for seed in range(per):
            generator = torch.Generator().manual_seed(seed)
            jobs.append(ImageJob(64, 64, cond, uncond, guidance, steps, generator))
    engine.submit(jobs)
    return [j.result.result(timeout=600) for j in jobs]


def score(scenes: list[shapes.Scene], pictures: list[np.ndarray], per: int) -> dict[str, float]:
    right = {name: 0 for name in shapes.ATTRIBUTES}
    whole = 0
    for i, picture in enumerate(pictures):
        marks = shapes.score(scenes[i // per], Image.fromarray(picture))
        for name, ok in marks.items():
            right[name] += ok
        whole += all(marks.values())
    total = len(pictures)
    result = {name: round(right[name] / total, 3) for name in shapes.ATTRIBUTES}
    result["all_attributes"] = round(sum(right.values()) / (total * len(right)), 3)
    result["whole_scene"] = round(whole / total, 3)
    return result


def save_grid(
    scenes: list[shapes.Scene], pictures: list[np.ndarray], per: int, path: Path, rows: int = 12
) -> None:
    """`rows` held-out captions, each with its first four pictures, enlarged 2x."""
    cell, label = 128, 360
    grid = Image.new("RGB", (label + 4 * cell, rows * cell), "white")
    pen = ImageDraw.Draw(grid)
    for r in range(min(rows, len(scenes))):
        pen.text((6, r * cell + cell // 2 - 6), scenes[r].caption(), fill="black")
        for c in range(min(4, per)):
            tile = Image.fromarray(pictures[r * per + c]).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label + c * cell, r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-caption", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--guidance", type=float, nargs="+", default=None, help="one or more (default: what the server uses)"
    )
    parser.add_argument("--grid", type=Path, default=None)
    parser.add_argument("--source", default=None, help="a pipeline directory (default: the shipped model)")
    args = parser.parse_args()
    cfg = Settings().model("shapes-diffusion").model_copy(update={"max_batch_images": 16})
    if args.source:
        cfg = cfg.model_copy(update={"source": args.source})
    engine = start_engine(cfg)
    report: dict[str, object] = {
        "command": " ".join(["bench/image_eval.py", *sys.argv[1:]]),
        **cpu_summary(),
        "steps": args.steps,
        "default_guidance": engine.denoiser.default_guidance,
    }
    started = time.monotonic()
    for guidance in args.guidance or [engine.denoiser.default_guidance]:
        report[f"guidance {guidance}"] = evaluate(engine, args, guidance)
    report["seconds"] = round(time.monotonic() - started, 1)
    engine.stop()
    print(json.dumps(report, indent=2))


def evaluate(engine: DiffusionEngine, args: argparse.Namespace, guidance: float) -> dict[str, object]:
    """Held-out captions and as many trained ones, scored at `guidance` (the grid: held-out)."""
    train, held_out = shapes.split_scenes()
    seen = random.Random(1).sample(train, len(held_out))
    report: dict[str, object] = {}
    for name, scenes in (("held_out", held_out), ("trained", seen)):
        pictures = generate(engine, scenes, args.per_caption, args.steps, guidance)
        report[name] = score(scenes, pictures, args.per_caption)
        report[f"{name}_pictures"] = len(pictures)
        if name == "held_out" and args.grid is not None:
            save_grid(scenes, pictures, args.per_caption, args.grid)
    return report


if __name__ == "__main__":
    main()
