"""What sizes, frame counts and defaults a pipeline takes, read from the pipeline and its configs.

Pipelines round a size or frame count they cannot use and only log it; the server refuses instead, so
the multiples here are the ones the pipeline's own latents need: the VAE's spatial factor times the
transformer's patch, times the pipeline's packing (counted once), and for videos the VAE's temporal
compression.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from server.models.call_specs import CallSpec
from server.models.limits import ModelDefaults, ModelLimits

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

# For a video pipeline whose signature names no rate: the rate most video models are trained at.
_FALLBACK_FPS = 16


def _int_attribute(owner: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(owner, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def spatial_factor(pipeline: DiffusionPipeline) -> int:
    """Pixels per latent pixel."""
    return (
        _int_attribute(
            pipeline,
            "vae_scale_factor_spatial",
            "vae_spatial_compression_ratio",
            "vae_spatial_scale_factor",
            "vae_scale_factor",
        )
        or 8
    )


def size_multiple(pipeline: DiffusionPipeline, spec: CallSpec) -> int:
    patch = getattr(pipeline.transformer.config, "patch_size", 1) or 1
    spatial_patch = int(patch[-1] if isinstance(patch, (tuple, list)) else patch)
    return spatial_factor(pipeline) * spatial_patch * spec.packing


def frame_step(pipeline: DiffusionPipeline, spec: CallSpec) -> int:
    """num_frames - 1 must be a multiple of this (the VAE's temporal compression, times the pipeline's
    temporal packing)."""
    return spec.temporal_packing * (
        _int_attribute(
            pipeline,
            "vae_scale_factor_temporal",
            "vae_temporal_compression_ratio",
            "vae_temporal_scale_factor",
        )
        or 1
    )


def _signature_default(pipeline: DiffusionPipeline, name: str) -> Any:
    parameter = inspect.signature(pipeline.__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def _default_size(pipeline: DiffusionPipeline) -> tuple[int, int]:
    """The size the pipeline computes when none is given, found where each pipeline keeps it."""
    width, height = _signature_default(pipeline, "width"), _signature_default(pipeline, "height")
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    config = pipeline.transformer.config
    factor = spatial_factor(pipeline)
    sample_size = getattr(pipeline, "default_sample_size", None)
    if isinstance(sample_size, int):
        return sample_size * factor, sample_size * factor
    sample_height, sample_width = (
        getattr(config, "sample_height", None),
        getattr(config, "sample_width", None),
    )
    if isinstance(sample_height, int) and isinstance(sample_width, int):
        return sample_width * factor, sample_height * factor
    sample_size = getattr(config, "sample_size", None)
    if isinstance(sample_size, int):
        return sample_size * factor, sample_size * factor
    default_height, default_width = (
        getattr(pipeline, "default_height", None),
        getattr(pipeline, "default_width", None),
    )
    if isinstance(default_height, int) and isinstance(default_width, int):
        return default_width, default_height
    return 1024, 1024


def _default_frames(pipeline: DiffusionPipeline) -> int:
    frames = _signature_default(pipeline, "num_frames")
    if isinstance(frames, int):
        return frames
    # CogVideoX reads its clip length from the transformer (49 for 1.0, 81 for 1.5).
    sample_frames = getattr(pipeline.transformer.config, "sample_frames", None)
    return sample_frames if isinstance(sample_frames, int) else 49


def _frames(pipeline: DiffusionPipeline, spec: CallSpec) -> int:
    """The default clip: a pipeline that drops leading frames of what it decodes (HunyuanVideo-I2V-33ch)
    makes its own default that much shorter."""
    return spec.default_frames or _default_frames(pipeline) - spec.frames_dropped


def defaults(pipeline: DiffusionPipeline, spec: CallSpec) -> ModelDefaults:
    """The call the pipeline makes when a request leaves a field out: its signature, its configs, and the
    known variants' model cards."""
    width, height = spec.default_size or _default_size(pipeline)
    steps = spec.default_steps or _signature_default(pipeline, "num_inference_steps")
    guidance = spec.default_guidance
    if guidance is None and spec.guidance_argument is not None:
        guidance = _signature_default(pipeline, spec.guidance_argument)
    video = spec.kind == "video"
    fps = spec.default_fps
    if fps is None and spec.fps_argument:
        fps = _signature_default(pipeline, spec.fps_argument)
    return ModelDefaults(
        width=width,
        height=height,
        num_frames=_frames(pipeline, spec) if video else None,
        steps=steps if isinstance(steps, int) else 50,
        guidance_scale=float(guidance) if isinstance(guidance, (int, float)) else 1.0,
        fps=(fps if isinstance(fps, int) else _FALLBACK_FPS) if video else None,
    )


def limits(defaults: ModelDefaults, kind: str) -> ModelLimits:
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
