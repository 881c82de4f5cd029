"""A rule-based reader of shapes images: what colour, shape, size and position an image shows.

It knows the dataset's palette, anchors and geometry, nothing learned:

* background: the palette colour nearest the median of the 2-pixel border;
* foreground pixels: those further from the background colour than max(25, half the 99.5th
  percentile of that distance); foreground colour: the palette colour nearest their median;
* coverage: each pixel's distance from the background over the foreground-background distance, so
  anti-aliased and blurred edges count in proportion; the object's box is where coverage > 0.5;
* position: the anchor nearest the box centre (every shape's box is centred on its anchor; the
  centroid is not, a triangle's sits low);
* size: small when the box's longer side is at most 23 px (small shapes span 14-21 px, large 25-40);
* shape: each of the four outlines is fitted to the box and drawn, and the one whose coverage map
  overlaps the image's best (soft intersection over union) wins.

``parse_prompt`` reads the same attributes from a prompt, so any caption-like prompt can be scored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from shapes import dataset

ATTRIBUTES: tuple[str, ...] = ("bg", "fg", "shape", "size", "position")
SMALL_MAX_EXTENT = 23.0
_PALETTE = np.array([dataset.COLOURS[name] for name in dataset.COLOUR_NAMES], dtype=np.float64)
_ANCHORS = {name: anchor for name, (_, anchor) in dataset.POSITIONS.items()}
# Box width and height of each outline per unit of r, and the box centre's offset from (cx, cy).
_STAR_OUTER = 1.1
_BOX: dict[str, tuple[float, float]] = {
    "circle": (2.0, 2.0),
    "square": (1.8, 1.8),
    "triangle": (2.1, 2.1 * math.sqrt(3) / 2),
    "star": (2 * _STAR_OUTER * math.sin(math.radians(72)), _STAR_OUTER * (1 + math.cos(math.radians(36)))),
}
_STAR_CENTRE_DROP = 0.1 + _STAR_OUTER * (1 - math.cos(math.radians(36))) / 2


@dataclass(frozen=True)
class Detection:
    bg: str
    fg: str | None
    shape: str | None
    size: str | None
    position: str | None

    def get(self, attribute: str) -> str | None:
        value: str | None = getattr(self, attribute)
        return value


def nearest_colour(rgb: np.ndarray) -> str:
    return dataset.COLOUR_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _template(shape: str, box: tuple[float, float, float, float], side: int) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` fitted to ``box`` (pixel edges), drawn at 4x and averaged."""
    x0, y0, x1, y1 = box
    unit_w, unit_h = _BOX[shape]
    r = ((x1 - x0) / unit_w + (y1 - y0) / unit_h) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "star":
        cy -= _STAR_CENTRE_DROP * r - 0.1 * r
    scale = 4
    canvas = Image.new("L", (side * scale, side * scale), 0)
    polygon = [(x * scale, y * scale) for x, y in dataset.outline(shape, cx, cy, r)]
    ImageDraw.Draw(canvas).polygon(polygon, fill=255)
    small = canvas.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def detect(image: np.ndarray) -> Detection:
    """Read one (h, w, 3) uint8 image. Attributes of an object that is not found are None."""
    pixels = image.astype(np.float64)
    side = pixels.shape[0]
    border = np.concatenate(
        [
            pixels[:2].reshape(-1, 3),
            pixels[-2:].reshape(-1, 3),
            pixels[:, :2].reshape(-1, 3),
            pixels[:, -2:].reshape(-1, 3),
        ]
    )
    bg_rgb = np.median(border, axis=0)
    bg = nearest_colour(bg_rgb)
    distance = np.sqrt(((pixels - bg_rgb) ** 2).sum(axis=-1))
    threshold = max(25.0, 0.5 * float(np.percentile(distance, 99.5)))
    foreground = distance > threshold
    if foreground.sum() < 4:
        return Detection(bg=bg, fg=None, shape=None, size=None, position=None)
    fg_rgb = np.median(pixels[foreground], axis=0)
    fg = nearest_colour(fg_rgb)
    coverage = np.clip(distance / max(float(np.sqrt(((fg_rgb - bg_rgb) ** 2).sum())), 1.0), 0.0, 1.0)
    ys, xs = np.nonzero(coverage > 0.5)
    if len(xs) == 0:
        return Detection(bg=bg, fg=fg, shape=None, size=None, position=None)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    extent = max(box[2] - box[0], box[3] - box[1])
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    position = min(_ANCHORS, key=lambda name: math.dist(_ANCHORS[name], centre))
    overlaps = {}
    for shape in dataset.SHAPES:
        template = _template(shape, box, side)
        overlaps[shape] = np.minimum(template, coverage).sum() / max(
            np.maximum(template, coverage).sum(), 1e-9
        )
    shape = max(overlaps, key=lambda name: overlaps[name])
    return Detection(
        bg=bg, fg=fg, shape=shape, size="small" if extent <= SMALL_MAX_EXTENT else "large", position=position
    )


def hollow_share(image: np.ndarray) -> float:
    """How much of the object's area shows the background: 0 for a filled shape, about half for one
    drawn as an outline.

    The object's area is its foreground pixels (as ``detect`` finds them) and everything they enclose,
    that is, every pixel the border cannot reach without crossing the foreground.
    """
    pixels = image.astype(np.float64)
    border = np.zeros(pixels.shape[:2], dtype=bool)
    border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
    bg_rgb = np.median(pixels[border], axis=0)
    distance = np.sqrt(((pixels - bg_rgb) ** 2).sum(axis=-1))
    foreground = distance > max(25.0, 0.5 * float(np.percentile(distance, 99.5)))
    if foreground.sum() < 4:
        return 0.0
    outside = border & ~foreground
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~foreground
        if (grown == outside).all():
            break
        outside = grown
    enclosed = ~outside & ~foreground
    return float(enclosed.sum() / (~outside).sum())


_POSITION_WORDS = {
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
    "center": "center",
    "middle": "center",
}
_SIZE_WORDS = {"small": "small", "tiny": "small", "large": "large", "big": "large"}


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt asks for: the colour before "background" is the background, the
    first other colour is the foreground; absent attributes are absent from the result."""
    words = re.findall(r"[a-z]+", prompt.lower())
    wanted: dict[str, str] = {}
    colours = [(i, w) for i, w in enumerate(words) if w in dataset.COLOURS]
    for i, word in colours:
        if i + 1 < len(words) and words[i + 1] == "background":
            wanted.setdefault("bg", word)
        else:
            wanted.setdefault("fg", word)
    for word in words:
        if word in dataset.SHAPES:
            wanted.setdefault("shape", word)
        elif word in _SIZE_WORDS:
            wanted.setdefault("size", _SIZE_WORDS[word])
        elif word in _POSITION_WORDS:
            wanted.setdefault("position", _POSITION_WORDS[word])
    return wanted


def score(wanted: dict[str, str], found: Detection) -> dict[str, bool]:
    """For each attribute in ``wanted``: whether the detection agrees."""
    return {name: found.get(name) == value for name, value in wanted.items()}


def scene_attributes(scene: dataset.Scene, *, all_attributes: bool = False) -> dict[str, str]:
    """What a scene's caption asks for (or, with ``all_attributes``, everything the image shows)."""
    wanted = {"bg": scene.bg, "fg": scene.fg, "shape": scene.shape}
    if scene.say_size or all_attributes:
        wanted["size"] = scene.size
    if scene.say_position or all_attributes:
        wanted["position"] = scene.position
    return wanted
