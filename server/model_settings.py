"""What a served model accepts (its limits) and what it assumes when a request leaves a field out.

Kept apart from ``models.py`` so that the built-in model table can declare its entries' settings
without importing the registry that loads them; ``models.py`` re-exports both classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["image", "video"]


@dataclass(frozen=True)
class ModelLimits:
    max_width: int
    max_height: int
    max_pixels: int
    max_frames: int
    max_steps: int
    max_n: int
    max_prompt_chars: int


@dataclass(frozen=True)
class ModelDefaults:
    width: int
    height: int
    num_frames: int | None
    steps: int
    guidance_scale: float
    fps: int | None
