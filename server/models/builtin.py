"""The embedded default models: the trained shapes model, and tiny genuine diffusers pipelines.

``shapes-flux`` ships as a saved FluxPipeline folder, trained here (docs/shapes-model.md). The tiny
models come from the tiny-pipeline factory (``tiny_pipelines``): real pipeline classes with seeded random
weights and tokenizers built in memory, so nothing is downloaded; their media is noise-like, but
depends on the prompt and the seed, bit for bit. A tiny build is written with ``save_pretrained`` into
``<cache_dir>/builtin/<name>-<fingerprint>`` and loaded back with ``DiffusionPipeline.from_pretrained``,
the path a hub model takes. The fingerprint hashes the recipe, the seed and the library versions, so a
changed recipe gets a new folder and an unchanged one is built once.

The settings a model needs at call time (its size, step count, ``max_sequence_length``) belong to its
entry here, not to special cases in the server.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from server.models.limits import ModelDefaults, ModelLimits
from tiny_pipelines import DEFAULT_SEED, tiny_pipeline
from tiny_pipelines.folders import write_folder_atomically
from tiny_pipelines.tokenizers import WORDS

if TYPE_CHECKING:
    # diffusers' package root types its classes as import-time placeholders; the modules do not.
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

# Bump when the build code changes in a way the recipe does not show, to retire old folders.
_BUILD_FORMAT = 2


@dataclass(frozen=True)
class BuiltinModel:
    """One embedded model: how to build it, and how the server should call it."""

    name: str
    # Constructor arguments per component, as plain data: the folder's fingerprint is taken from it.
    recipe: Mapping[str, Mapping[str, Any]]
    builder: Callable[[Mapping[str, Mapping[str, Any]], int], DiffusionPipeline]
    defaults: ModelDefaults
    limits: ModelLimits
    call_kwargs: Mapping[str, Any]
    # A trained model ships as a saved pipeline folder: it is loaded from there, never built.
    folder: Path | None = None
    # FluxPipeline's default_sample_size (latent pixels), which save_pretrained does not keep.
    sample_size: int | None = None
    # Cache presets measured on this model, replacing its family's (keyed like PRESET_NAMES).
    presets: Callable[[], Mapping[str, Any]] | None = None
    # LoRA adapters trained for this model, shipped beside it: name to the folder diffusers wrote.
    adapters: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))

    def build(self, seed: int = DEFAULT_SEED) -> DiffusionPipeline:
        """The pipeline in memory, with weights drawn from ``seed`` (same seed, same bits)."""
        return self.builder(self.recipe, seed)

    def fingerprint(self, seed: int = DEFAULT_SEED) -> str:
        import diffusers
        import torch
        import transformers

        described = {
            "format": _BUILD_FORMAT,
            "recipe": self.recipe,
            "seed": seed,
            "words": WORDS,
            # Initialisation and serialisation may change between releases.
            "versions": [torch.__version__, diffusers.__version__, transformers.__version__],
        }
        encoded = json.dumps(described, sort_keys=True, default=repr).encode()
        return hashlib.sha256(encoded).hexdigest()[:12]


def materialize(model: BuiltinModel, cache_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """The folder holding ``model`` saved with ``save_pretrained``, building it if it is missing.

    The build goes to a staging folder that is renamed into place, so a crash or a concurrent
    build never leaves a half-written folder where a complete one is expected.
    """
    if model.folder is not None:
        return model.folder
    folder = cache_dir / "builtin" / f"{model.name}-{model.fingerprint(seed)}"
    if not folder.is_dir():
        # Not replace: a concurrent build of the same folder that finished first is as good as ours.
        write_folder_atomically(folder, model.build(seed).save_pretrained)
    return folder


# -- shapes-flux ---------------------------------------------------------------------------------------

# Trained here on 64x64 renders of coloured shapes (``python -m shapes.train``; docs/shapes-model.md).
SHAPES_FLUX_FOLDER = Path(__file__).resolve().parents[1] / "assets" / "shapes-flux"
# A rank-16 adapter trained on the same captions with the shapes drawn as outlines (``python -m
# shapes.adapter``; docs/shapes-model.md): the effect is one the base model never learned.
SHAPES_FLUX_OUTLINE_FOLDER = SHAPES_FLUX_FOLDER.with_name("shapes-flux-outline")


def _load_shipped(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    """The shipped weights: trained, so the seed has nothing to draw."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    return FluxPipeline.from_pretrained(SHAPES_FLUX_FOLDER, local_files_only=True)


def _shapes_flux_presets() -> Mapping[str, Any]:
    """The fastest point at 30 / 35 / 40 dB PSNR against the uncached image, measured at the default
    true CFG 3 over 50 prompts (docs/quality.md): TaylorSeer lite at interval 4 runs 35% of the
    blocks (32.2 dB, 2.2x), at interval 3 45% (36.8 dB, 1.8x), at interval 2 55% (40.3 dB, 1.5x).
    """
    from server.models.presets import taylorseer_lite

    return {
        "fast": taylorseer_lite(4),
        "balanced": taylorseer_lite(3),
        "quality": taylorseer_lite(2),
    }


_TINY_FLUX = tiny_pipeline("flux")
_TINY_WAN = tiny_pipeline("wan")

# -- the table -----------------------------------------------------------------------------------------

# Prompts this short fit T5's 16 tokens loosely; longer ones are truncated by the tokenizer.
_MAX_PROMPT_CHARS = 1000

BUILTIN_MODELS: Mapping[str, BuiltinModel] = MappingProxyType(
    {
        # First, so that it answers image requests that name no model.
        "shapes-flux": BuiltinModel(
            name="shapes-flux",
            recipe=MappingProxyType({}),
            builder=_load_shipped,
            # True CFG (one extra transformer call per step) is what gets the colours and sizes right.
            defaults=ModelDefaults(
                width=64, height=64, num_frames=None, steps=20, guidance_scale=3.0, fps=None
            ),
            # Trained at 64x64 only: larger sizes are allowed but leave its training distribution.
            limits=ModelLimits(
                max_width=128,
                max_height=128,
                max_pixels=128 * 128,
                max_frames=1,
                max_steps=100,
                max_n=8,
                max_prompt_chars=_MAX_PROMPT_CHARS,
            ),
            # Trained with T5 padded to 16 tokens; the joint attention sees the padding, so a longer
            # pad is a different input (colour accuracy falls from 0.93 at 16 to 0 at 512).
            call_kwargs=MappingProxyType({"max_sequence_length": 16}),
            folder=SHAPES_FLUX_FOLDER,
            sample_size=16,
            presets=_shapes_flux_presets,
            adapters=MappingProxyType({"outline": SHAPES_FLUX_OUTLINE_FOLDER}),
        ),
        "tiny-flux": BuiltinModel(
            name="tiny-flux",
            recipe=_TINY_FLUX.recipe,
            builder=_TINY_FLUX.builder,
            defaults=ModelDefaults(
                width=64, height=64, num_frames=None, steps=10, guidance_scale=1.0, fps=None
            ),
            limits=ModelLimits(
                max_width=256,
                max_height=256,
                max_pixels=256 * 256,
                max_frames=1,
                max_steps=100,
                max_n=8,
                max_prompt_chars=_MAX_PROMPT_CHARS,
            ),
            # The pipeline's default pads T5 to 512 tokens: 30x the work of the whole transformer here.
            call_kwargs=MappingProxyType({"max_sequence_length": 16}),
        ),
        "tiny-wan": BuiltinModel(
            name="tiny-wan",
            recipe=_TINY_WAN.recipe,
            builder=_TINY_WAN.builder,
            # Wan runs classifier-free guidance by default (two transformer calls per step); so does
            # this model, so that both branches are exercised.
            defaults=ModelDefaults(width=32, height=32, num_frames=5, steps=10, guidance_scale=5.0, fps=8),
            limits=ModelLimits(
                max_width=128,
                max_height=128,
                max_pixels=128 * 128,
                max_frames=33,
                max_steps=100,
                max_n=4,
                max_prompt_chars=_MAX_PROMPT_CHARS,
            ),
            call_kwargs=MappingProxyType({"max_sequence_length": 16}),
        ),
    }
)

BUILTIN_MODEL_NAMES: tuple[str, ...] = tuple(BUILTIN_MODELS)
