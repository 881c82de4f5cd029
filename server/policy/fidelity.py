"""What a calibration compares: a generation's output as pixels, and the PSNR of its squared error against
the uncached output."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from server.models.generation import GenerationResult

__all__ = ["output_pixels", "psnr_of"]


def output_pixels(result: GenerationResult) -> np.ndarray:
    """Every image, or every frame of every video, stacked, in float64."""
    frames = result.images or [frame for video in result.videos or [] for frame in video]
    return np.stack([np.asarray(frame, dtype=np.float64) for frame in frames])


def psnr_of(squared: float, count: float) -> float:
    """The PSNR of 8-bit pixels whose squared errors sum to ``squared`` over ``count`` values; inf when
    they are identical."""
    mse = squared / count
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
