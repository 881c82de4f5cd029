"""One generation on a resident model, with its stages timed.

For the families with an adapter here (Flux, Wan) the pipeline's own ``__call__`` is split into its
three stages, each run with the pipeline's own code, so the result is bit-identical to calling the
pipeline in one go:

1. ``text_encoding``: ``pipeline.encode_prompt``; the embeddings are then passed in.
2. ``denoising``: the pipeline called with ``output_type="latent"``; ``callback_on_step_end`` times
   each step and calls ``on_step_end(step_index)``, whose exceptions stop the pipeline and
   propagate out of ``generate``.
3. ``decoding``: the pipeline's own latent-to-pixel steps (unpacking, VAE statistics, decode,
   post-processing).

Guidance: ``guidance_scale > 1`` runs classifier-free guidance against ``negative_prompt`` (the
empty prompt when there is none), one extra transformer call per step. For Flux without guidance
embedding that is the pipeline's true CFG (``true_cfg_scale``), the only way a guidance scale can
act on it. A guidance-distilled Flux (``guidance_embeds``) takes the scale as its embedded guidance
instead and ignores ``negative_prompt``, as FluxPipeline does.

Other pipelines fall back to one call with ``output_type="pil"``; their whole call is timed as
``denoising`` (text encoding and decoding are inside it and read 0).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from PIL import Image

    from server.models import ResidentModel

__all__ = [
    "GenerationParams",
    "GenerationResult",
    "InvalidGenerationParams",
    "check_params",
    "generate",
]

STAGES: tuple[str, ...] = ("text_encoding", "denoising", "decoding")


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_frames: int | None
    steps: int
    guidance_scale: float
    seed: int
    n: int


@dataclass
class GenerationResult:
    images: list[Image.Image] | None
    videos: list[list[Image.Image]] | None
    # Milliseconds per stage, keys STAGES.
    timings_ms: dict[str, float]
    # Milliseconds per denoising step; the first also holds the pipeline's set-up before its loop.
    step_times_ms: list[float]


class InvalidGenerationParams(ValueError):
    """Parameters the model cannot honour; ``param`` names the field at fault."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_params(model: ResidentModel, params: GenerationParams) -> None:
    """Raise InvalidGenerationParams unless ``model`` can run ``params`` exactly as asked.

    Pipelines round a size or frame count they cannot use and only log it; this refuses instead,
    so that the media returned always has the requested shape.
    """
    limits = model.limits
    for name in ("prompt", "negative_prompt"):
        text = getattr(params, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise InvalidGenerationParams(f"{name} is over {limits.max_prompt_chars} characters", param=name)
    for name, value, bound in (
        ("width", params.width, limits.max_width),
        ("height", params.height, limits.max_height),
        ("steps", params.steps, limits.max_steps),
        ("n", params.n, limits.max_n),
    ):
        if not 1 <= value <= bound:
            raise InvalidGenerationParams(f"{name} must be between 1 and {bound}, got {value}", param=name)
    for name, value in (("width", params.width), ("height", params.height)):
        if value % model.size_multiple:
            raise InvalidGenerationParams(
                f"{name} must be a multiple of {model.size_multiple} for {model.name}, got {value}",
                param=name,
            )
    if params.width * params.height > limits.max_pixels:
        raise InvalidGenerationParams(
            f"{params.width}x{params.height} is over {limits.max_pixels} pixels", param="width"
        )
    if params.guidance_scale < 0:
        raise InvalidGenerationParams("guidance_scale must not be negative", param="guidance_scale")
    if model.kind == "image":
        if params.num_frames is not None:
            raise InvalidGenerationParams("num_frames applies to video models only", param="num_frames")
        return
    frames = params.num_frames
    if frames is None or not 1 <= frames <= limits.max_frames or (frames - 1) % model.frame_step:
        raise InvalidGenerationParams(
            f"num_frames must be 1 + a multiple of {model.frame_step}, at most {limits.max_frames}, "
            f"got {frames}",
            param="num_frames",
        )


def generate(
    model: ResidentModel,
    params: GenerationParams,
    *,
    on_step_end: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Run one generation of ``params.n`` images or videos; raises InvalidGenerationParams."""
    check_params(model, params)
    adapter = _ADAPTERS.get(type(model.pipeline).__name__, _generate_in_one_call)
    clock = _Clock(model.pipeline.device, on_step_end)
    with torch.no_grad():
        images, videos = adapter(model, params, clock)
    return GenerationResult(
        images=images,
        videos=videos,
        timings_ms={stage: clock.timings_ms.get(stage, 0.0) for stage in STAGES},
        step_times_ms=clock.step_times_ms,
    )


# -- timing -------------------------------------------------------------------------------------------


@dataclass
class _Clock:
    """Stage and step timings; on a GPU it waits for queued work so that each time is the stage's."""

    device: torch.device
    on_step_end: Callable[[int], None] | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    step_times_ms: list[float] = field(default_factory=list)
    _last_step_end: float = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self._now()
        self._last_step_end = start
        yield
        self.timings_ms[name] = (self._now() - start) * 1000.0

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def step_callback(
        self, pipeline: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]
    ) -> dict[str, Any]:
        """``callback_on_step_end`` for the pipeline; returns no tensors to replace."""
        now = self._now()
        self.step_times_ms.append((now - self._last_step_end) * 1000.0)
        self._last_step_end = now
        if self.on_step_end is not None:
            self.on_step_end(step)
        return {}


# -- adapters -----------------------------------------------------------------------------------------

_Media: TypeAlias = "tuple[list[Image.Image] | None, list[list[Image.Image]] | None]"


def _max_sequence_length(pipe: Any, call_kwargs: dict[str, Any]) -> int:
    """The text length the pipeline's own call would encode with."""
    if "max_sequence_length" in call_kwargs:
        return int(call_kwargs["max_sequence_length"])
    return int(inspect.signature(pipe.__call__).parameters["max_sequence_length"].default)


def _cfg_negative(params: GenerationParams) -> str | None:
    """The negative prompt when guidance runs, else None."""
    if params.guidance_scale > 1:
        return params.negative_prompt or ""
    return None


def _generate_flux(model: ResidentModel, params: GenerationParams, clock: _Clock) -> _Media:
    pipe: Any = model.pipeline
    call_kwargs = dict(model.call_kwargs)
    encode_kwargs = {
        "device": pipe._execution_device,
        "num_images_per_prompt": params.n,
        "max_sequence_length": _max_sequence_length(pipe, call_kwargs),
    }
    distilled = bool(pipe.transformer.config.guidance_embeds)
    negative_prompt = None if distilled else _cfg_negative(params)
    with clock.stage("text_encoding"):
        prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(prompt=params.prompt, **encode_kwargs)
        guidance: dict[str, Any] = {}
        if negative_prompt is not None:
            negative_embeds, negative_pooled, _ = pipe.encode_prompt(prompt=negative_prompt, **encode_kwargs)
            guidance = {
                "negative_prompt_embeds": negative_embeds,
                "negative_pooled_prompt_embeds": negative_pooled,
                "true_cfg_scale": params.guidance_scale,
            }
    with clock.stage("denoising"):
        # The embeddings already hold n rows, so the pipeline sees a batch of n prompts.
        latents = pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            **guidance,
            height=params.height,
            width=params.width,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=clock.generator(params.seed),
            output_type="latent",
            callback_on_step_end=clock.step_callback,
            **call_kwargs,
        ).images
    with clock.stage("decoding"):
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, params.height, params.width, pipe.vae_scale_factor)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        latents = latents.to(vae.device)
        decoded = vae.decode(latents, return_dict=False)[0]
        images = pipe.image_processor.postprocess(decoded, output_type="pil")
    return images, None


def _generate_wan(model: ResidentModel, params: GenerationParams, clock: _Clock) -> _Media:
    pipe: Any = model.pipeline
    call_kwargs = dict(model.call_kwargs)
    negative_prompt = _cfg_negative(params)
    with clock.stage("text_encoding"):
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt=params.prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=negative_prompt is not None,
            num_videos_per_prompt=params.n,
            max_sequence_length=_max_sequence_length(pipe, call_kwargs),
            device=pipe._execution_device,
        )
    with clock.stage("denoising"):
        latents = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            height=params.height,
            width=params.width,
            num_frames=params.num_frames,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            generator=clock.generator(params.seed),
            output_type="latent",
            callback_on_step_end=clock.step_callback,
            **call_kwargs,
        ).frames
    with clock.stage("decoding"):
        vae = pipe.vae
        latents = latents.to(vae.device, dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        latents_mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        # Written as the pipeline writes it (divide by the reciprocal), so the result is bit-identical.
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / latents_std + latents_mean
        decoded = vae.decode(latents, return_dict=False)[0]
        videos = pipe.video_processor.postprocess_video(decoded, output_type="pil")
    return None, videos


def _generate_in_one_call(model: ResidentModel, params: GenerationParams, clock: _Clock) -> _Media:
    pipe: Any = model.pipeline
    accepted = inspect.signature(pipe.__call__).parameters
    per_prompt = "num_videos_per_prompt" if "num_videos_per_prompt" in accepted else "num_images_per_prompt"
    kwargs: dict[str, Any] = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "height": params.height,
        "width": params.width,
        "num_frames": params.num_frames,
        "num_inference_steps": params.steps,
        "guidance_scale": params.guidance_scale,
        "generator": clock.generator(params.seed),
        per_prompt: params.n,
        "output_type": "pil",
        "callback_on_step_end": clock.step_callback,
        **model.call_kwargs,
    }
    # Pipelines differ in what they accept; None means "the pipeline's own default".
    kwargs = {key: value for key, value in kwargs.items() if key in accepted and value is not None}
    with clock.stage("denoising"):
        output = pipe(**kwargs)
    if model.kind == "video":
        return None, [list(frames) for frames in output.frames]
    return list(output.images), None


_ADAPTERS: dict[str, Callable[[ResidentModel, GenerationParams, _Clock], _Media]] = {
    "FluxPipeline": _generate_flux,
    "WanPipeline": _generate_wan,
}
