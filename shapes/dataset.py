"""Procedural 64x64 images of one coloured shape on a flat background, with captions.

Every image is drawn at 4x and box-filtered down, so edges are anti-aliased the same way in every
image. A scene is fully described by a ``Scene``; ``scenes(n, seed)`` is deterministic in ``seed``,
and the renderer has no randomness of its own, so the same seed always gives the same pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: dict[str, tuple[float, float]] = {"small": (7.0, 10.0), "large": (14.0, 18.0)}
# The phrase a caption uses for each anchor, and the anchor's centre in pixels.
POSITIONS: dict[str, tuple[str, tuple[float, float]]] = {
    "center": ("in the center", (32.0, 32.0)),
    "left": ("at the left", (19.0, 32.0)),
    "right": ("at the right", (45.0, 32.0)),
    "top": ("at the top", (32.0, 19.0)),
    "bottom": ("at the bottom", (32.0, 45.0)),
}
# The stroke of an outlined shape (the trained adapter's style), in 64-px units. Through the shipped
# VAE (25 dB on outlined scenes, against 31 dB on filled ones) a large shape stays hollow at 3 px;
# a small one's inside blurs.
OUTLINE_WIDTH = 3.0
COLOUR_JITTER = 12
POSITION_JITTER = 3.0
# Each optional phrase is left out this often; the image still has a size and a position.
OMIT_PROBABILITY = 0.3

# The words a caption can contain, plus a few a user is likely to type about these images.
WORDS: tuple[str, ...] = (
    *["a", "an", "the", "on", "at", "in", "of", "with", "and", "background"],
    *["small", "large", "big", "tiny"],
    *SHAPES,
    *["left", "right", "top", "bottom", "center", "middle", "shape", "image", "picture"],
    *COLOUR_NAMES,
)


@dataclass(frozen=True)
class Scene:
    shape: str
    fg: str
    bg: str
    size: str
    position: str
    fg_rgb: tuple[int, int, int]
    bg_rgb: tuple[int, int, int]
    cx: float
    cy: float
    r: float
    say_size: bool = True
    say_position: bool = True

    @property
    def caption(self) -> str:
        words = ["a"]
        if self.say_size:
            words.append(self.size)
        words += [self.fg, self.shape]
        if self.say_position:
            words.append(POSITIONS[self.position][0])
        words.append(f"on a {self.bg} background")
        return " ".join(words)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    shifted = np.clip(np.array(rgb) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    return (int(shifted[0]), int(shifted[1]), int(shifted[2]))


def sample_scene(rng: np.random.Generator) -> Scene:
    shape = SHAPES[rng.integers(len(SHAPES))]
    fg = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    others = [c for c in COLOUR_NAMES if c != fg]
    bg = others[rng.integers(len(others))]
    size = ("small", "large")[rng.integers(2)]
    position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
    return jittered_scene(rng, shape=shape, fg=fg, bg=bg, size=size, position=position)


def jittered_scene(
    rng: np.random.Generator, *, shape: str, fg: str, bg: str, size: str, position: str
) -> Scene:
    """A scene with these attributes, its colours, place, radius and caption drawn as in training."""
    ax, ay = POSITIONS[position][1]
    low, high = SIZES[size]
    return Scene(
        shape=shape,
        fg=fg,
        bg=bg,
        size=size,
        position=position,
        fg_rgb=_jitter(rng, COLOURS[fg]),
        bg_rgb=_jitter(rng, COLOURS[bg]),
        cx=ax + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
        cy=ay + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
        r=float(rng.uniform(low, high)),
        say_size=bool(rng.random() >= OMIT_PROBABILITY),
        say_position=bool(rng.random() >= OMIT_PROBABILITY),
    )


def scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes drawn from one seeded stream: shape, colours, size and anchor all uniform."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of ``shape`` in 64-px units (a circle is approximated finely)."""
    if shape == "circle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 96)]
    if shape == "square":
        h = 0.9 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        side = 2.1 * r
        height = side * math.sqrt(3) / 2
        return [(cx, cy - height / 2), (cx + side / 2, cy + height / 2), (cx - side / 2, cy + height / 2)]
    if shape == "star":
        outer = 1.1 * r
        inner = 0.45 * outer
        oy = cy + 0.1 * r
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), oy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, *, outlined: bool = False) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 array; ``outlined`` draws the shape's edge only, the inside left
    the background's colour."""
    big = Image.new("RGB", (SIZE * _SUPERSAMPLE, SIZE * _SUPERSAMPLE), scene.bg_rgb)
    polygon = [
        (x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in outline(scene.shape, scene.cx, scene.cy, scene.r)
    ]
    draw = ImageDraw.Draw(big)
    if outlined:
        draw.polygon(polygon, outline=scene.fg_rgb, width=round(OUTLINE_WIDTH * _SUPERSAMPLE))
    else:
        draw.polygon(polygon, fill=scene.fg_rgb)
    return np.asarray(big.resize((SIZE, SIZE), Image.Resampling.BOX))


def render_batch(batch: Sequence[Scene], *, outlined: bool = False) -> np.ndarray:
    """(n, 64, 64, 3) uint8."""
    return np.stack([render(scene, outlined=outlined) for scene in batch])
