"""What a served model accepts (its limits) and what it assumes when a request leaves a field out.

Kept apart from the registry (``registry.py``) so that the built-in model table and the wire protocol can
declare these settings without importing the registry that loads models.
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
