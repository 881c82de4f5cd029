"""One generation on a resident model: the pipeline's own ``__call__``, once, with its stages timed.

The request's fields become the pipeline's arguments through the model's call spec
(``server.models.call_specs``); the stages are timed by the hooks of the model's stage probe
(``server.models.stages``), so every family is timed, cancelled and stopped at its deadline the same way, and
the output is the one a direct call of the pipeline with the same arguments and seed gives.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Hashable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from server.models.media import Soundtrack
from server.models.tasks import STRENGTH_TASKS, image_task, steps_run, text_task, text_tasks

if TYPE_CHECKING:
    from PIL import Image

    from server.models.limits import Kind, ModelDefaults
    from server.models.prompt_cache import Tally
    from server.models.registry import ResidentModel
    from server.models.tasks import Task, TaskPipeline
    from server.models.trajectories import Resumed, TrajectoryRun

# A pipeline's ``callback_on_step_end``: (pipeline, step index, timestep, tensors) -> tensors to replace.
StepCallback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]

__all__ = [
    "GenerationParams",
    "GenerationResult",
    "InvalidGenerationParams",
    "call_arguments",
    "check_params",
    "generate",
    "keep_outside_the_mask",
    "task_of",
    "trajectory_setting",
]


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
    # Videos: the rate the pipeline is told, where it takes one (LTX), and the container's rate.
    fps: int | None = None
    # An image-conditioned task: the image it starts from, the mask of what to repaint (the pipelines'
    # convention: white is painted), and how far from the image to go (1: all the way to noise).
    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float | None = None
    # The image-conditioned task asked for; None: text to image or video. Left out with an image, it is
    # inpainting with a mask, else image-to-image (an edit model's edit is asked by name).
    task: Task | None = None
    # LoRA adapters by name and weight, applied in this order (server.models.adapters).
    loras: tuple[tuple[str, float], ...] = ()
    # Further images after ``image``, for an edit model that takes several.
    more_images: tuple[Image.Image, ...] = ()

    def __post_init__(self) -> None:
        if self.task is None and self.image is not None:
            kind: Kind = "image" if self.num_frames is None else "video"
            object.__setattr__(self, "task", image_task({}, masked=self.mask is not None, kind=kind))

    @property
    def steps_run(self) -> int:
        """The denoising steps the pipeline runs: all of ``steps``, or ``strength`` of them."""
        return steps_run(self.steps, self.strength if self.task in STRENGTH_TASKS else None)

    @classmethod
    def from_defaults(cls, defaults: ModelDefaults, *, prompt: str, **overrides: Any) -> GenerationParams:
        """A model's defaults for size, frames, steps, guidance and fps, with one image or video of
        seed 0 and no negative prompt; ``overrides`` replaces any field by name.

        An unknown field name raises TypeError, as the constructor does.
        """
        params = cls(
            prompt=prompt,
            negative_prompt=None,
            width=defaults.width,
            height=defaults.height,
            num_frames=defaults.num_frames,
            steps=defaults.steps,
            guidance_scale=defaults.guidance_scale,
            seed=0,
            n=1,
            fps=defaults.fps,
        )
        return replace(params, **overrides)


@dataclass
class GenerationResult:
    images: list[Image.Image] | None
    videos: list[list[Image.Image]] | None
    # Milliseconds per stage the pipeline went through (keys from server.stages.STAGES); a stage it
    # does not have is absent.
    timings_ms: Mapping[str, float]
    # Milliseconds per denoising step.
    step_times_ms: list[float]
    # Prompt encodings answered from the model's prompt cache and computed; None: it keeps none.
    text_cache: Tally | None = None
    # The sound made with each video (LTX-2); None where the model makes none.
    sounds: list[Soundtrack] | None = None
    # The earlier request whose trajectory this run started from; None: it started from its own noise.
    resumed: Resumed | None = None


class InvalidGenerationParams(ValueError):
    """Parameters the model cannot honour; ``param`` names the field at fault."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def _check_area(model: ResidentModel, params: GenerationParams) -> None:
    """Refuse a size the pipeline would scale to its trained area (HiDream's rule, computed as it does)."""
    pipeline: Any = model.pipeline
    factor = int(pipeline.vae_scale_factor)
    side = int(pipeline.default_sample_size) * factor
    scale = math.sqrt(side * side / (params.width * params.height))
    division = 2 * factor
    made = (
        int(params.width * scale // division * division),
        int(params.height * scale // division * division),
    )
    if made != (params.width, params.height):
        raise InvalidGenerationParams(
            f"{model.name} computes every image at {side}x{side} pixels' area in the aspect asked: "
            f"{params.width}x{params.height} would come out {made[0]}x{made[1]}; ask for that size",
            param="width",
        )


def check_params(model: ResidentModel, params: GenerationParams) -> None:
    """Raise InvalidGenerationParams unless ``model`` can run ``params`` exactly as asked.

    Pipelines round a size or frame count they cannot use and only log it, and drop arguments they do
    not use; this refuses instead, so that the media returned is what was asked for.
    """
    limits = model.limits
    for name in ("prompt", "negative_prompt"):
        text = getattr(params, name)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise InvalidGenerationParams(f"{name} is over {limits.max_prompt_chars} characters", param=name)
    if params.negative_prompt is not None and not model.call_spec.negative_prompt:
        raise InvalidGenerationParams(
            f"{model.name} ({type(model.pipeline).__name__}) takes no negative prompt",
            param="negative_prompt",
        )
    for name, value, low, high in (
        ("width", params.width, 1, limits.max_width),
        ("height", params.height, 1, limits.max_height),
        ("steps", params.steps, model.call_spec.min_steps, limits.max_steps),
        ("n", params.n, 1, limits.max_n),
    ):
        if not low <= value <= high:
            raise InvalidGenerationParams(f"{name} must be between {low} and {high}, got {value}", param=name)
    for name, value in (("width", params.width), ("height", params.height)):
        if value % model.size_multiple:
            raise InvalidGenerationParams(
                f"{name} must be a multiple of {model.size_multiple} for {model.name}, got {value}",
                param=name,
            )
    if model.call_spec.fixed_area:
        _check_area(model, params)
    fixed = (model.defaults.width, model.defaults.height)
    if model.call_spec.fixed_size and (params.width, params.height) != fixed:
        raise InvalidGenerationParams(
            f"{model.name} computes only {fixed[0]}x{fixed[1]} pixels, got {params.width}x{params.height}",
            param="width" if params.width != fixed[0] else "height",
        )
    if params.width * params.height > limits.max_pixels:
        raise InvalidGenerationParams(
            f"{params.width}x{params.height} is over {limits.max_pixels} pixels", param="width"
        )
    if params.guidance_scale < 0:
        raise InvalidGenerationParams("guidance_scale must not be negative", param="guidance_scale")
    for index, (name, _) in enumerate(params.loras):
        if model.adapters is None or name not in model.adapters:
            offered = (
                "none" if model.adapters is None else ", ".join(a.name for a in model.adapters) or "none"
            )
            raise InvalidGenerationParams(
                f"{model.name} has no adapter {name!r}; it has: {offered}", param=f"loras.{index}.name"
            )
    _check_task(model, params)
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


def _check_task(model: ResidentModel, params: GenerationParams) -> None:
    if params.image is None:
        for name in ("mask", "strength"):
            if getattr(params, name) is not None:
                raise InvalidGenerationParams(f"{name} applies to a request with an image", param=name)
        if not text_tasks(model.kind, model.call_spec):
            raise InvalidGenerationParams(
                f"{model.name} ({type(model.pipeline).__name__}) needs an image: it does "
                f"{', '.join(model.task_names)}",
                param="image",
            )
        return
    task = params.task
    if task is None or task not in model.tasks:
        does = ", ".join(model.task_names)
        raise InvalidGenerationParams(
            f"{model.name} ({type(model.pipeline).__name__}) has no {str(task).replace('_', '-')} pipeline; "
            f"it does: {does}",
            # A model that takes an image, just not a mask (or only with one): the mask is at fault.
            param="mask"
            if (task == "inpainting" and model.tasks) or "inpainting" in model.tasks
            else "image",
        )
    # A pipeline that checks its images itself (FLUX.2's is at least 64 px a side) checks them here, so
    # that an image it refuses is a 422 before the queue, not a failure inside the run.
    check = getattr(getattr(model.tasks[task].pipeline, "image_processor", None), "check_image_input", None)
    if callable(check):
        images = (params.image, *params.more_images)
        for index, image in enumerate(images):
            try:
                check(image)
            except ValueError as exc:
                raise InvalidGenerationParams(
                    str(exc), param="image" if len(images) == 1 else f"image.{index}"
                ) from exc
    if task not in STRENGTH_TASKS:
        if params.strength is not None:
            raise InvalidGenerationParams(
                f"{model.name} takes the image whole for {task}: it takes no strength", param="strength"
            )
        return
    # Any strength above 0 runs at least one step: diffusers counts the steps skipped rounding down.
    if params.strength is None or not 0 < params.strength <= 1:
        raise InvalidGenerationParams(f"strength must be in (0, 1], got {params.strength}", param="strength")


def task_of(model: ResidentModel, params: GenerationParams) -> TaskPipeline:
    """The pipeline that runs ``params`` on ``model``: its text pipeline, or the task's."""
    return model.task_pipeline(params.task or text_task(model.kind))


def call_arguments(model: ResidentModel, params: GenerationParams) -> dict[str, Any]:
    """The keyword arguments of the pipeline call for ``params``, the step callback and generator aside.

    A direct call of the task's pipeline (``task_of``) with these, a generator seeded with
    ``params.seed`` on the pipeline's device and ``output_type="pil"`` is the reference for what the
    server returns uncached.
    """
    spec = task_of(model, params).call_spec
    kwargs: dict[str, Any] = {
        "prompt": params.prompt,
        "height": params.height,
        "width": params.width,
        "num_inference_steps": params.steps,
        spec.per_prompt_argument: params.n,
    }
    if model.kind == "video":
        frames = params.num_frames
        # A pipeline that drops leading frames is asked for them on top, to return the frames requested.
        kwargs["num_frames"] = frames if frames is None else frames + spec.frames_dropped
    if spec.guidance_argument is not None:
        kwargs[spec.guidance_argument] = params.guidance_scale
    negative_prompt = params.negative_prompt
    if negative_prompt is None and spec.guidance_argument == "true_cfg_scale" and params.guidance_scale > 1:
        # True CFG runs only against a negative prompt; without one, the empty prompt is the
        # unconditional branch, as in classifier-free guidance everywhere else.
        negative_prompt = ""
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    if spec.fps_argument is not None and params.fps is not None:
        kwargs[spec.fps_argument] = params.fps
    if spec.inputs:
        kwargs["image"] = [params.image, *params.more_images] if params.more_images else params.image
        if "mask_image" in spec.inputs:
            kwargs["mask_image"] = params.mask
        if spec.takes_strength:
            kwargs["strength"] = params.strength
    if spec.area_argument is not None:
        kwargs[spec.area_argument] = params.width * params.height
    kwargs.update(spec.fixed_arguments)
    kwargs.update(model.call_kwargs)
    return kwargs


def keep_outside_the_mask(pipeline: Any, params: GenerationParams, painted: Image.Image) -> Image.Image:
    """``painted`` with the request's own pixels wherever its mask does not paint, as diffusers'
    ``apply_overlay`` lays them: the pipeline works on latents, and its decoder would otherwise return
    even the pixels it was told to keep changed."""
    assert params.image is not None and params.mask is not None
    source, mask = params.image, params.mask
    if source.size != painted.size:
        source = pipeline.image_processor.resize(source, height=painted.height, width=painted.width)
        mask = pipeline.mask_processor.resize(mask, height=painted.height, width=painted.width)
    kept: Image.Image = pipeline.image_processor.apply_overlay(mask, source, painted)
    return kept


def generate(
    model: ResidentModel,
    params: GenerationParams,
    *,
    on_step_end: Callable[[int], None] | None = None,
    trajectory: TrajectoryRun | None = None,
    tenant: str = "",
    own_scheduler: bool = False,
) -> GenerationResult:
    """Run one generation of ``params.n`` images or videos, checked beforehand by ``check_params``.

    ``on_step_end(step_index)`` runs after each denoising step; what it raises stops the pipeline and
    propagates out of here. With ``trajectory`` (a text task, on a model that keeps trajectories), the
    run may start from a similar earlier prompt's kept latents, and keeps its own. ``tenant`` names whose
    kept prompt embeddings it may use. ``own_scheduler``: run on a copy of the pipeline with schedulers of
    its own, for a generation running beside others on the same model copy.
    """
    pipeline: Any = task_of(model, params).pipeline
    if own_scheduler:
        pipeline = with_own_schedulers(pipeline)
    kwargs = call_arguments(model, params)
    tallied = model.prompt_cache.tally(tenant) if model.prompt_cache is not None else nullcontext(None)
    adapted = (
        model.adapters.applied(params.loras) if params.loras and model.adapters is not None else nullcontext()
    )
    probe = model.trajectory_probe if trajectory is not None and params.task is None else None
    resuming = probe.running(trajectory) if probe is not None and trajectory is not None else nullcontext()
    with tallied as text_cache, adapted, resuming, model.stages.measure(on_step_end) as clock:
        if model.call_spec.steps_observed_by == "callback":
            kwargs["callback_on_step_end"] = clock.step_callback
            if probe is not None and trajectory is not None:
                kwargs["callback_on_step_end"] = _along(trajectory, clock.step_callback)
        output = pipeline(
            **kwargs,
            generator=torch.Generator(pipeline.device).manual_seed(params.seed),
            output_type="pil",
        )
    if probe is not None and trajectory is not None:
        trajectory.finish()
    images, videos, sounds = None, None, None
    if model.kind == "video":
        videos = [list(frames) for frames in output.frames]
        sounds = soundtracks(pipeline, output)
    else:
        images = list(output.images)
        if params.task == "inpainting":
            images = [keep_outside_the_mask(pipeline, params, image) for image in images]
    return GenerationResult(
        images=images,
        videos=videos,
        timings_ms=dict(clock.stage_ms),
        step_times_ms=list(clock.step_times_ms),
        text_cache=text_cache,
        sounds=sounds,
        resumed=None if trajectory is None else trajectory.resumed,
    )


def with_own_schedulers(pipeline: Any) -> Any:
    """``pipeline`` sharing every module but its schedulers, which keep one call's state (the step index,
    the sigmas, a solver's history); the pipeline's own per-call attributes land on the copy too."""
    from diffusers import SchedulerMixin

    shell = copy.copy(pipeline)
    for name, component in pipeline.components.items():
        if isinstance(component, SchedulerMixin):
            shell.__dict__[name] = copy.deepcopy(component)
    return shell


def trajectory_setting(tenant: str, params: GenerationParams) -> Hashable:
    """What two requests must share for one to start from the other's latents: everything but the
    prompt and the seed (a resumed request's noise is the kept run's)."""
    return (
        tenant,
        params.width,
        params.height,
        params.num_frames,
        params.steps,
        params.guidance_scale,
        params.negative_prompt,
        params.n,
        params.fps,
        params.loras,
    )


def _along(trajectory: TrajectoryRun, step_callback: StepCallback) -> StepCallback:
    """The step callback of a run along a trajectory: it keeps or hands over latents, then the clock's."""

    def called(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        handed = trajectory.step_end(step, tensors)
        return {**step_callback(pipeline, step, timestep, tensors), **handed}

    return called


def soundtracks(pipeline: Any, output: Any) -> list[Soundtrack] | None:
    """The sound of each video where the pipeline makes it with the video (LTX-2's ``audio``, at its
    vocoder's rate); None elsewhere."""
    audio = getattr(output, "audio", None)
    config = getattr(getattr(pipeline, "vocoder", None), "config", None)
    rate = getattr(config, "output_sampling_rate", None) or getattr(config, "sampling_rate", None)
    if not isinstance(audio, torch.Tensor) or not isinstance(rate, int):
        return None
    return [Soundtrack(track.float().cpu().numpy(), rate) for track in audio]
