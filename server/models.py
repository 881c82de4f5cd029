"""The registry of resident pipelines: load one from a name, a folder or a hub id, and describe it.

``load_model(spec)`` accepts a built-in name (``BUILTIN_MODEL_NAMES``), a local folder written by
``save_pretrained``, or a hub id (``org/name``). All three go through diffusers' own
``DiffusionPipeline.from_pretrained``; built-ins are first built into a folder under ``cache_dir``.

What the server needs to know about a loaded pipeline comes from two tables here, keyed by the
transformer family that ``cache_engine`` recognises: the family's kind (image or video) and call
defaults, and its cache presets. Built-in models bring their own defaults, limits and call kwargs.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import torch

from server.builtin_models import BUILTIN_MODEL_NAMES, BUILTIN_MODELS, BuiltinModel, materialize
from server.model_settings import ModelDefaults, ModelLimits

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    from cache_engine import CacheConfig, CacheEngine

__all__ = [
    "BUILTIN_MODEL_NAMES",
    "PRESET_NAMES",
    "ModelDefaults",
    "ModelLimits",
    "ModelLoadError",
    "ResidentModel",
    "load_model",
]

logger = logging.getLogger(__name__)

Kind = Literal["image", "video"]
PRESET_NAMES: tuple[str, ...] = ("fast", "balanced", "quality")

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelLoadError(Exception):
    """A model spec that names nothing loadable, or a pipeline this server cannot serve."""


@dataclass
class ResidentModel:
    name: str
    kind: Kind
    family: str
    source: str
    pipeline: DiffusionPipeline
    engine: CacheEngine
    defaults: ModelDefaults
    limits: ModelLimits
    # Keyed by PRESET_NAMES. A preset whose method this model cannot run is left out, so that asking
    # for it is an error rather than a silently uncached run.
    presets: Mapping[str, CacheConfig | None]
    # Fixed extra pipeline kwargs the model needs on every call, e.g. {"max_sequence_length": 16}.
    call_kwargs: Mapping[str, Any]
    supported_methods: tuple[str, ...]
    # Width and height must be multiples of this (VAE downsampling times the transformer's patch).
    size_multiple: int = 8
    # Videos: num_frames - 1 must be a multiple of this (the VAE's temporal compression).
    frame_step: int = 1


# -- per-family knowledge -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    kind: Kind
    defaults: ModelDefaults


def _image(width: int, steps: int, guidance: float) -> _Family:
    return _Family("image", ModelDefaults(width, width, None, steps, guidance, None))


def _video(width: int, height: int, frames: int, steps: int, guidance: float, fps: int) -> _Family:
    return _Family("video", ModelDefaults(width, height, frames, steps, guidance, fps))


# Names are cache_engine's family names. Defaults are each model card's recommended call.
_FAMILIES: Mapping[str, _Family] = MappingProxyType(
    {
        "flux": _image(1024, 28, 3.5),
        "flux2": _image(1024, 28, 4.0),
        "qwenimage": _image(1024, 50, 4.0),
        "sd3": _image(1024, 28, 7.0),
        "cogview4": _image(1024, 50, 3.5),
        "pixart": _image(1024, 20, 4.5),
        "cogvideox": _video(720, 480, 49, 50, 6.0, 8),
        "wan": _video(832, 480, 81, 50, 5.0, 16),
        "hunyuan_video": _video(1280, 720, 129, 50, 6.0, 24),
        "ltx": _video(704, 480, 161, 50, 3.0, 24),
        "mochi": _video(848, 480, 85, 64, 4.5, 30),
    }
)


def _presets_table(family: str, kind: Kind) -> dict[str, CacheConfig]:
    """Cache presets, from the fastest to the most faithful.

    Flux's come from measurements on a tiny Flux trained on CPU (20 steps, PSNR against the
    uncached image): TaylorSeer lite skips every block and extrapolates the output projection;
    at interval 5 it runs 35% of the blocks (38.8 dB, 1.6x), at interval 3 45% (46 dB, 1.45x),
    ahead of FirstBlockCache at every point of that curve. FirstBlockCache 0.05 is near lossless
    (75 dB): it skips only steps whose first block barely moved.

    Other families have no measurement here, so they get the model-agnostic FirstBlockCache,
    whose threshold bounds the error it accepts per step (0.05 is the reference default, 0.2 the
    documentation's aggressive example). Video families get Pyramid Attention Broadcast in the
    middle: its paper's setting (recompute spatial attention every 2nd step, between timesteps
    100 and 800) is what it was designed and evaluated for.
    """
    from cache_engine import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    from .presets import taylorseer_lite

    if family == "flux":
        return {
            "fast": taylorseer_lite(5),
            "balanced": taylorseer_lite(3),
            "quality": FirstBlockCacheConfig(threshold=0.05),
        }
    balanced: CacheConfig = (
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800)
        )
        if kind == "video"
        else FirstBlockCacheConfig(threshold=0.1)
    )
    return {
        "fast": FirstBlockCacheConfig(threshold=0.2),
        "balanced": balanced,
        "quality": FirstBlockCacheConfig(threshold=0.05),
    }


def _presets(
    family: str, kind: Kind, engine: CacheEngine, measured: Mapping[str, CacheConfig] | None = None
) -> Mapping[str, CacheConfig | None]:
    presets: dict[str, CacheConfig | None] = {}
    for name, config in (measured or _presets_table(family, kind)).items():
        try:
            engine.check(config)
        except ValueError as exc:
            logger.warning("cache preset %r is unavailable on this %s model: %s", name, family, exc)
        else:
            presets[name] = config
    return MappingProxyType(presets)


def _kind(family: str, pipeline: DiffusionPipeline) -> Kind:
    known = _FAMILIES.get(family)
    if known is not None:
        return known.kind
    return "video" if "num_frames" in inspect.signature(pipeline.__call__).parameters else "image"


def _hub_defaults(family: str, kind: Kind, pipeline: DiffusionPipeline) -> ModelDefaults:
    known = _FAMILIES.get(family)
    if known is None:
        known = _video(512, 512, 25, 50, 5.0, 16) if kind == "video" else _image(1024, 30, 5.0)
    defaults = known.defaults
    config = getattr(pipeline.transformer, "config", None)
    if family == "flux" and not getattr(config, "guidance_embeds", True):
        # A Flux without guidance embedding (schnell) only gets guidance through true CFG, which
        # doubles the cost of every step; it is off unless asked for.
        defaults = ModelDefaults(
            defaults.width, defaults.height, defaults.num_frames, defaults.steps, 1.0, defaults.fps
        )
    return defaults


def _hub_limits(defaults: ModelDefaults, kind: Kind) -> ModelLimits:
    """Twice the trained size per side, and the trained clip length: beyond that quality falls."""
    side = 2 * max(defaults.width, defaults.height)
    return ModelLimits(
        max_width=side,
        max_height=side,
        max_pixels=4 * defaults.width * defaults.height,
        max_frames=defaults.num_frames or 1,
        max_steps=200,
        max_n=4 if kind == "image" else 1,
        max_prompt_chars=4000,
    )


def _size_multiple(pipeline: DiffusionPipeline) -> int:
    processor = getattr(pipeline, "image_processor", None) or getattr(pipeline, "video_processor", None)
    vae_factor = int(getattr(getattr(processor, "config", None), "vae_scale_factor", 8))
    patch = getattr(pipeline.transformer.config, "patch_size", 1) or 1
    spatial_patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    return vae_factor * int(spatial_patch)


def _frame_step(pipeline: DiffusionPipeline) -> int:
    for attribute in (
        "vae_scale_factor_temporal",
        "vae_temporal_compression_ratio",
        "vae_temporal_scale_factor",
    ):
        value = getattr(pipeline, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


# -- loading --------------------------------------------------------------------------------------------


def _from_pretrained(source: str, torch_dtype: torch.dtype, *, local: bool) -> DiffusionPipeline:
    from diffusers import DiffusionPipeline

    try:
        # local_files_only: a folder must never turn into a download when a file is missing.
        return DiffusionPipeline.from_pretrained(source, dtype=torch_dtype, local_files_only=local)
    except Exception as exc:
        raise ModelLoadError(f"could not load a diffusers pipeline from {source!r}: {exc}") from exc


def _resolve(
    spec: str, builtin: BuiltinModel | None, torch_dtype: torch.dtype, cache_dir: Path
) -> tuple[str, str, DiffusionPipeline]:
    """(name, source, pipeline) for ``spec``."""
    if builtin is not None:
        folder = materialize(builtin, cache_dir)
        return builtin.name, f"builtin:{folder}", _from_pretrained(str(folder), torch_dtype, local=True)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        folder = folder.resolve()
        return folder.name, f"local:{folder}", _from_pretrained(str(folder), torch_dtype, local=True)
    if _HUB_ID.fullmatch(spec):
        return spec, f"hub:{spec}", _from_pretrained(spec, torch_dtype, local=False)
    raise ModelLoadError(
        f"{spec!r} is not a built-in model ({', '.join(BUILTIN_MODEL_NAMES)}), "
        "an existing folder or a hub id (org/name)"
    )


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32", cache_dir: Path) -> ResidentModel:
    """Load ``spec`` onto ``device`` and install its cache engine; raises ModelLoadError."""
    from cache_engine import CacheEngine

    torch_dtype = _DTYPES.get(dtype)
    if torch_dtype is None:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    builtin = BUILTIN_MODELS.get(spec)
    name, source, pipeline = _resolve(spec, builtin, torch_dtype, cache_dir)
    transformer = getattr(pipeline, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ModelLoadError(
            f"{spec!r} loads as {type(pipeline).__name__}, which has no transformer; "
            "only diffusion transformer pipelines are served"
        )
    try:
        pipeline.to(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"could not move {spec!r} to device {device!r}: {exc}") from exc
    pipeline.set_progress_bar_config(disable=True)
    if builtin is not None and builtin.sample_size is not None:
        pipeline.default_sample_size = builtin.sample_size

    engine = CacheEngine(transformer)
    family = engine.family
    kind = _kind(family, pipeline)
    defaults = builtin.defaults if builtin else _hub_defaults(family, kind, pipeline)
    return ResidentModel(
        name=name,
        kind=kind,
        family=family,
        source=source,
        pipeline=pipeline,
        engine=engine,
        defaults=defaults,
        limits=builtin.limits if builtin else _hub_limits(defaults, kind),
        presets=_presets(family, kind, engine, builtin.presets() if builtin and builtin.presets else None),
        call_kwargs=builtin.call_kwargs if builtin else MappingProxyType({}),
        supported_methods=engine.supported_methods,
        size_multiple=_size_multiple(pipeline),
        frame_step=_frame_step(pipeline) if kind == "video" else 1,
    )
