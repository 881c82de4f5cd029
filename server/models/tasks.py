"""What a served model does besides text to image or video: its image-conditioned tasks, each a diffusers
pipeline built on the model's resident components (as ``from_pipe`` builds it, without its dtype cast), never a
second copy of its weights.

The transformers are the model's own, so every cache policy acts on a task as it does on the model's
text pipeline. An edit, image-to-video or inpainting model's task is its own pipeline; an image-to-video
or inpainting model's pipeline needs the image (and the mask), so it has no text task.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from server.models.call_specs import CallSpec, task_call_spec
from server.models.limits import Kind

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = [
    "DEFAULT_STRENGTH",
    "STRENGTH_TASKS",
    "Task",
    "TaskPipeline",
    "image_task",
    "image_tasks",
    "steps_run",
    "task_pipelines",
    "text_task",
    "text_tasks",
]

Task = Literal["text_to_image", "text_to_video", "image_to_image", "inpainting", "edit", "image_to_video"]
# The tasks that start from the image noised to a strength; an edit takes it whole, as context.
STRENGTH_TASKS: tuple[Task, ...] = ("image_to_image", "inpainting")
# diffusers' default for its image-to-image and inpainting pipelines.
DEFAULT_STRENGTH = 0.6


@dataclass(frozen=True)
class _Only:
    """A task's diffusers class that only some checkpoints of the text pipeline can run: those whose
    pipeline config sets ``flag``."""

    class_name: str
    flag: str

    def fits(self, pipeline: DiffusionPipeline) -> bool:
        return bool(pipeline.config.get(self.flag, False))


# Per text pipeline class, the diffusers classes of its image-conditioned tasks, or the checkpoints of it
# that have one. Each pair is tested end to end (the direct call's output, over HTTP); a class that is not
# here has no such task.
_IMAGE_TASKS: Mapping[str, Mapping[Task, str | _Only]] = {
    "FluxPipeline": {"image_to_image": "FluxImg2ImgPipeline", "inpainting": "FluxInpaintPipeline"},
    "StableDiffusion3Pipeline": {
        "image_to_image": "StableDiffusion3Img2ImgPipeline",
        "inpainting": "StableDiffusion3InpaintPipeline",
    },
    "QwenImagePipeline": {
        "image_to_image": "QwenImageImg2ImgPipeline",
        "inpainting": "QwenImageInpaintPipeline",
    },
    # Kontext and FLUX.2 Klein inpaint with their own transformer, the image noised to a strength behind the
    # mask; their edit stays the model's own pipeline.
    "FluxKontextPipeline": {"inpainting": "FluxKontextInpaintPipeline"},
    "Flux2KleinPipeline": {"inpainting": "Flux2KleinInpaintPipeline"},
    # LTX conditions its first latent frame on the image, with the text model's own transformer.
    "LTXPipeline": {"image_to_video": "LTXImageToVideoPipeline"},
    # So does a Wan checkpoint with expand_timesteps (Wan 2.2 TI2V 5B), and no other: its transformer takes a
    # timestep per token, and WanImageToVideoPipeline puts the image's latents in the first latent frame at
    # timestep 0, an input the text model's transformer takes as it is. Without expand_timesteps (Wan 2.1,
    # Wan 2.2 A14B) the pipeline gives the transformer a mask of the frames given and the image's latents
    # beside the noise (36 channels where a text-to-video transformer takes 16): only the transformer of an
    # image-to-video checkpoint takes that.
    "WanPipeline": {"image_to_video": _Only("WanImageToVideoPipeline", flag="expand_timesteps")},
}
# Edit models: their own pipeline edits the request's images (in context, at no strength), as many as
# the model takes (FLUX.2 conditions on up to 10 reference images).
_EDIT_MODELS: Mapping[str, int] = {"FluxKontextPipeline": 1, "Flux2Pipeline": 10, "Flux2KleinPipeline": 10}
# Image-to-video models: checkpoints of their own (Wan 2.1's transformer attends to the image's CLIP tokens,
# CogVideoX's takes its latents beside the noise, HunyuanVideo's LLaVA reads the image with the prompt),
# whose pipeline animates the request's image and cannot run without one: image_to_video is all they do.
_IMAGE_TO_VIDEO_MODELS: tuple[str, ...] = (
    "WanImageToVideoPipeline",
    "CogVideoXImageToVideoPipeline",
    "HunyuanVideoImageToVideoPipeline",
)
# Inpainting models: checkpoints whose transformer takes the masked image's latents and the mask beside the
# noise (FLUX.1 Fill), so their pipeline cannot run without an image and a mask: inpainting is all they do.
_INPAINTING_MODELS: tuple[str, ...] = ("FluxFillPipeline",)
# What a request fills in each task's call, besides strength.
_INPUTS: Mapping[Task, tuple[str, ...]] = {
    "image_to_image": ("image",),
    "inpainting": ("image", "mask_image"),
    "edit": ("image",),
    "image_to_video": ("image",),
}


@dataclass(frozen=True)
class TaskPipeline:
    task: Task
    pipeline: DiffusionPipeline
    call_spec: CallSpec
    # The images one request may bring.
    max_images: int = 1
    # The strength a request that gives none runs at: the task pipeline's own default (0.6 for most, 1 for
    # an inpainting model's or Kontext's, 0.8 for FLUX.2 Klein's), as a direct call without it would.
    default_strength: float = DEFAULT_STRENGTH


def text_task(kind: Kind) -> Task:
    return "text_to_image" if kind == "image" else "text_to_video"


def text_tasks(kind: Kind, spec: CallSpec) -> tuple[Task, ...]:
    """The text task of a model of ``kind`` whose pipeline is called by ``spec``: none where that pipeline
    needs an image (an image-to-video model's)."""
    return () if spec.inputs else (text_task(kind),)


def task_pipelines() -> dict[str, str]:
    """Each image-conditioned pipeline class served, with how: the task of a text pipeline it is built
    for, or an edit model served as one."""
    served = {name: "an edit model" for name in _EDIT_MODELS}
    served.update({name: "an image-to-video model" for name in _IMAGE_TO_VIDEO_MODELS})
    served.update({name: "an inpainting model" for name in _INPAINTING_MODELS})
    for text_class, tasks in _IMAGE_TASKS.items():
        for task, entry in tasks.items():
            how = f"{task.replace('_', '-')} of `{text_class}`"
            if isinstance(entry, _Only):
                how += f" with `{entry.flag}`"
            name = _class_name(entry)
            # WanImageToVideoPipeline is both an image-to-video model and Wan 2.2 TI2V 5B's task.
            served[name] = f"{served[name]} and as {how}" if name in served else how
    return served


def image_tasks(pipeline: DiffusionPipeline, spec: CallSpec) -> dict[Task, TaskPipeline]:
    """The image-conditioned tasks of ``pipeline``, whose call spec is ``spec``; raises UnservablePipeline
    when a task's pipeline does not take what its spec passes."""
    import diffusers

    tasks: dict[Task, TaskPipeline] = {}
    name = type(pipeline).__name__
    if name in _EDIT_MODELS:
        edit_spec = task_call_spec(pipeline, spec, _INPUTS["edit"], strength=False)
        tasks["edit"] = TaskPipeline("edit", pipeline, edit_spec, max_images=_EDIT_MODELS[name])
    if name in _IMAGE_TO_VIDEO_MODELS:
        video_spec = task_call_spec(pipeline, spec, _INPUTS["image_to_video"], strength=False)
        tasks["image_to_video"] = TaskPipeline("image_to_video", pipeline, video_spec)
    if name in _INPAINTING_MODELS:
        inpainting_spec = task_call_spec(pipeline, spec, _INPUTS["inpainting"], strength=True)
        tasks["inpainting"] = TaskPipeline(
            "inpainting", pipeline, inpainting_spec, default_strength=_default_strength(pipeline)
        )
    for task, entry in _IMAGE_TASKS.get(name, {}).items():
        if isinstance(entry, _Only) and not entry.fits(pipeline):
            continue
        task_pipeline = _on_the_same_components(pipeline, getattr(diffusers, _class_name(entry)))
        task_pipeline.set_progress_bar_config(disable=True)
        tasks[task] = TaskPipeline(
            task,
            task_pipeline,
            task_call_spec(task_pipeline, spec, _INPUTS[task], strength=task in STRENGTH_TASKS),
            default_strength=_default_strength(task_pipeline),
        )
    return tasks


def _default_strength(pipeline: DiffusionPipeline) -> float:
    parameter = inspect.signature(pipeline.__call__).parameters.get("strength")
    default = None if parameter is None else parameter.default
    return float(default) if isinstance(default, (int, float)) else DEFAULT_STRENGTH


def _class_name(entry: str | _Only) -> str:
    return entry.class_name if isinstance(entry, _Only) else entry


def _on_the_same_components(pipeline: DiffusionPipeline, cls: type[DiffusionPipeline]) -> DiffusionPipeline:
    """An instance of ``cls`` on ``pipeline``'s very components and configuration, as ``from_pipe``
    builds it, but without its cast of every component to its dtype argument (float32 by default):
    that cast would reach the shared transformer, and a model served in bfloat16 would be in float32
    for every task, its text pipeline included."""
    parameters = inspect.signature(cls.__init__).parameters
    components = pipeline.components
    arguments: dict[str, Any] = {name: components[name] for name in parameters if name in components}
    config = dict(pipeline.config)
    arguments.update({name: config[name] for name in parameters if name not in arguments and name in config})
    return cls(**arguments)


def image_task(tasks: Mapping[Task, TaskPipeline], *, masked: bool, kind: Kind) -> Task:
    """The task a request with an image asks of a model of ``kind`` with ``tasks``: inpainting with a
    mask, else a video from the image, else the edit of an edit model, else image-to-image (whether or
    not the model has the task: a missing one is refused, naming the field)."""
    if masked:
        return "inpainting"
    if kind == "video":
        return "image_to_video"
    return "edit" if "edit" in tasks else "image_to_image"


def steps_run(steps: int, strength: float | None) -> int:
    """The denoising steps a pipeline runs for ``steps`` at ``strength`` (None: text, all of them): those
    past the first ``steps - strength x steps``, as diffusers' ``get_timesteps`` counts them."""
    if strength is None:
        return steps
    return steps - int(max(steps - min(steps * strength, steps), 0))
