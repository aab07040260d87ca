"""The procedural world of the `shapes-diffusion` demo model: scenes, their captions, their
pictures, and a reader that gets a scene's attributes back from pixels.

A scene is one or two filled shapes of one kind, color and size in one region of a plain
background, captioned e.g. "two small red circles on a white background, top left". The
training script draws scenes at random; `bench/image_eval.py` captions held-out scenes, asks the
model for them and scores what `read_scene` finds in its pictures, attribute by attribute.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels per side
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
SIZES = {"small": 6, "large": 12}  # half the shape's width, pixels
COUNTS = ("one", "two")
ATTRIBUTES = ("shape", "color", "size", "count", "position", "background")
# Centers of the five regions; two shapes sit side by side around it.
_CENTERS = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "center": (32, 32),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    count: str
    position: str
    background: str

    def caption(self) -> str:
        noun = self.shape + ("s" if self.count == "two" else "")
        return (
            f"{self.count} {self.size} {self.color} {noun} on a {self.background} background, {self.position}"
        )


def all_scenes() -> list[Scene]:
    """Every scene of the world; two shapes are always small (two large ones do not fit a region)."""
    scenes = []
    for shape, color, size, count, position, bg in itertools.product(
        SHAPES, COLORS, SIZES, COUNTS, POSITIONS, BACKGROUNDS
    ):
        if count == "two" and size == "large":
            continue
        scenes.append(Scene(shape, color, size, count, position, bg))
    return scenes


def split_scenes(seed: int = 0, held_out: float = 0.1) -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes): a fixed random tenth of all captions never trained on."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    cut = int(len(scenes) * held_out)
    return scenes[cut:], scenes[:cut]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up, as wide as it is tall
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return None


def draw(scene: Scene, rng: random.Random) -> Image.Image:
    """A picture of `scene`, placed with a little random jitter."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    r = SIZES[scene.size]
    cx, cy = _CENTERS[scene.position]
    cx, cy = cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3)
    centers = [(cx, cy)] if scene.count == "one" else [(cx - r - 2, cy), (cx + r + 2, cy)]
    for x, y in centers:
        outline = _outline(scene.shape, x, y, r)
        if outline is None:
            pen.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[scene.color])
        else:
            pen.polygon(outline, fill=COLORS[scene.color])
    return image


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected regions (4-neighbour) of a boolean mask, each as an array of (y, x)."""
    seen = np.zeros_like(mask)
    found = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, points = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            points.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(np.array(points))
    return found


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((rgb - np.array(palette[name])) ** 2)))


def _shape_of(points: np.ndarray) -> str:
    """By how much of its bounding box a shape fills, and where: a square fills all of it, a
    circle pi/4, a triangle pointing up half, thin at the top."""
    ys, xs = points[:, 0], points[:, 1]
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(points) / (h * w)
    top = np.sum(ys < ys.min() + h / 3) / len(points)
    if fill > 0.9:
        return "square"
    if fill < 0.66 and top < 0.2:
        return "triangle"
    return "circle"


def _position_of(cx: float, cy: float) -> str:
    if abs(cx - 32) < 8 and abs(cy - 32) < 8:
        return "center"
    return ("top" if cy < 32 else "bottom") + " " + ("left" if cx < 32 else "right")


def read_scene(image: Image.Image) -> dict[str, str]:
    """The attributes a picture shows, read from its pixels: background from the border, shapes
    as the connected regions of foreground pixels (specks under 12 pixels ignored)."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.sqrt(np.sum((pixels - background) ** 2, axis=2)) > 80
    parts = [p for p in _components(mask) if len(p) >= 12]
    found = {"background": _nearest(background, BACKGROUNDS)}
    if not parts:
        return found
    found["count"] = {1: "one", 2: "two"}.get(len(parts), str(len(parts)))
    biggest = max(parts, key=len)
    found["shape"] = _shape_of(biggest)
    found["color"] = _nearest(pixels[biggest[:, 0], biggest[:, 1]].mean(axis=0), COLORS)
    width = biggest[:, 1].max() - biggest[:, 1].min() + 1
    found["size"] = "small" if width < (SIZES["small"] + SIZES["large"]) else "large"
    everything = np.concatenate(parts)
    found["position"] = _position_of(everything[:, 1].mean(), everything[:, 0].mean())
    return found


def score(scene: Scene, image: Image.Image) -> dict[str, bool]:
    """For each attribute of `scene`: does the picture show it?"""
    found = read_scene(image)
    return {name: found.get(name) == getattr(scene, name) for name in ATTRIBUTES}
