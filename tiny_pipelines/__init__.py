"""Tiny but genuine diffusers pipelines, built offline: one factory for the built-in models, the tests
and the benchmarks.

Each entry is a real pipeline class wired to its real component classes (text encoders and
tokenizers included), shrunk until a generation takes a fraction of a second on a CPU. Weights are
seeded random, tokenizers are built in memory (``tokenizers.py``), nothing is downloaded. One module
per pipeline holds its ``RECIPE`` (constructor arguments as plain data, which a built-in model's
folder fingerprints), its ``build(recipe, seed)`` and its ``SMALL_CALL`` (the smallest request
worth making: width, height and, for videos, num_frames).

Callers that need another shape (the engine tests, the benchmarks' scales) lay ``overrides`` over a
recipe (``merge``) rather than keep builders of their own, and callers that pass prompt embeddings
build without text encoders (``text_encoders=False``).
"""

from __future__ import annotations

import importlib
import re
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

    def build(
        self, seed: int = DEFAULT_SEED, *, overrides: Recipe | None = None, text_encoders: bool = True
    ) -> DiffusionPipeline:
        """The pipeline in memory, in eval mode, with weights drawn from ``seed`` (same seed, same bits).

        ``overrides`` replaces entries of the recipe's components (see ``merge``). Each component draws
        its weights from a stream of its own, so the components an override leaves alone keep the
        weights they have without it.

        ``text_encoders=False`` leaves the text encoders and tokenizers out (``None``, as diffusers
        accepts when prompt embeddings are passed). They are built and then dropped, since each family
        module builds its pipeline whole; the other components, each from its own stream, are bit for
        bit those of the full pipeline.
        """
        import torch

        recipe = self.recipe if overrides is None else merge(self.recipe, overrides)
        pipeline = self.builder(recipe, seed)
        if not text_encoders:
            pipeline.register_modules(
                **{name: None for name in pipeline.components if _TEXT_COMPONENT.fullmatch(name)}
            )
        # A pipeline loaded with from_pretrained is in eval mode; one built here is used the same way.
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
        return pipeline


# The components a pipeline needs only to turn a prompt into embeddings: text_encoder, tokenizer_2, ...
_TEXT_COMPONENT = re.compile(r"(text_encoder|tokenizer)(_\d+)?")


def merge(recipe: Recipe, overrides: Recipe) -> Recipe:
    """``recipe`` with ``overrides`` laid over it, component by component: an overridden component keeps
    the entries the override does not name.

    A component the recipe does not have is a KeyError, so that a misspelt name is not silently
    ignored (a misspelt entry inside a component is refused by the component's constructor).
    """
    unknown = sorted(set(overrides) - set(recipe))
    if unknown:
        raise KeyError(f"no component {unknown} in the recipe; it has {sorted(recipe)}")
    return {name: {**config, **overrides.get(name, {})} for name, config in recipe.items()}


# Name -> (module, attribute prefix); the module's RECIPE, build and SMALL_CALL, prefixed where one
# module holds several variants (Wan 2.1, Wan 2.2 A14B and Wan 2.2 TI2V 5B, for text and for images, the
# 5B's two pipelines from one recipe; HunyuanVideo-I2V's two conditionings).
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
        "wan22_5b": ("wan", "TI2V_"),
        "hunyuan_video": ("hunyuan_video", ""),
        "ltx": ("ltx", ""),
        "z_image": ("z_image", ""),
        "lumina2": ("lumina2", ""),
        "sana": ("sana", ""),
        "chroma": ("chroma", ""),
        "aura_flow": ("aura_flow", ""),
        "cogview3plus": ("cogview3plus", ""),
        "skyreels_v2": ("skyreels_v2", ""),
        "mochi": ("mochi", ""),
        "hidream": ("hidream", ""),
        "hunyuan_video15": ("hunyuan_video15", ""),
        "ltx2": ("ltx2", ""),
        "wan_i2v": ("wan_i2v", ""),
        "wan22_i2v": ("wan_i2v", "WAN22_"),
        "wan22_ti2v": ("wan_i2v", "TI2V_"),
        "cogvideox_i2v": ("cogvideox_i2v", ""),
        "hunyuan_video_i2v": ("hunyuan_video_i2v", ""),
        "hunyuan_video_i2v_33ch": ("hunyuan_video_i2v", "CONCAT_"),
    }
)

TINY_PIPELINE_NAMES: tuple[str, ...] = tuple(_MODULES)
# Those whose pipeline needs an image besides the prompt (image-to-video checkpoints): a call of one
# passes ``image`` on top of its SMALL_CALL.
IMAGE_TO_VIDEO_NAMES: tuple[str, ...] = (
    "wan_i2v",
    "wan22_i2v",
    "wan22_ti2v",
    "cogvideox_i2v",
    "hunyuan_video_i2v",
    "hunyuan_video_i2v_33ch",
)


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
