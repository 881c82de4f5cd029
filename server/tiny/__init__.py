"""Tiny but genuine diffusers pipelines, built offline: one factory for the built-in models, the tests
and the benchmarks.

Each entry is a real pipeline class wired to its real component classes (text encoders and
tokenizers included), shrunk until a generation takes a fraction of a second on a CPU. Weights are
seeded random, tokenizers are built in memory (``tokenizers.py``), nothing is downloaded. One module
per pipeline holds its ``RECIPE`` (constructor arguments as plain data, which a built-in model's
folder fingerprints), its ``build(recipe, seed)`` and its ``SMALL_CALL`` (the smallest request
worth making: width, height and, for videos, num_frames).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

DEFAULT_SEED = 0

Recipe = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class TinyPipeline:
    name: str
    recipe: Recipe
    builder: Callable[[Recipe, int], DiffusionPipeline]
    small_call: Mapping[str, Any]

    def build(self, seed: int = DEFAULT_SEED) -> DiffusionPipeline:
        """The pipeline in memory, with weights drawn from ``seed`` (same seed, same bits)."""
        return self.builder(self.recipe, seed)


# Name -> (module, attribute prefix); the module's RECIPE, build and SMALL_CALL, prefixed where one
# module holds two variants (Wan 2.1 and Wan 2.2).
_MODULES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "flux": ("flux", ""),
        "flux2": ("flux2", ""),
        "qwenimage": ("qwenimage", ""),
        "sd3": ("sd3", ""),
        "cogview4": ("cogview4", ""),
        "pixart_sigma": ("pixart_sigma", ""),
        "cogvideox": ("cogvideox", ""),
        "wan": ("wan", ""),
        "wan22": ("wan", "WAN22_"),
        "hunyuan_video": ("hunyuan_video", ""),
        "ltx": ("ltx", ""),
    }
)

TINY_PIPELINE_NAMES: tuple[str, ...] = tuple(_MODULES)


def tiny_pipeline(name: str) -> TinyPipeline:
    """The tiny pipeline called ``name`` (one of TINY_PIPELINE_NAMES); raises KeyError."""
    module_name, prefix = _MODULES[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return TinyPipeline(
        name=name,
        recipe=getattr(module, f"{prefix}RECIPE"),
        builder=getattr(module, f"{prefix.lower()}build"),
        small_call=getattr(module, f"{prefix}SMALL_CALL"),
    )


def build(name: str, seed: int = DEFAULT_SEED) -> DiffusionPipeline:
    return tiny_pipeline(name).build(seed)
