"""How the server calls each pipeline class: one call spec per family, checked against the pipeline at load.

The server calls a pipeline's own ``__call__`` once, as a user of diffusers would. What differs between
families is data, kept here:

- which argument carries the request's ``guidance_scale``: ``guidance_scale`` (classifier-free
  guidance, or guidance embedded in a distilled transformer), ``true_cfg_scale`` (Flux without
  guidance embedding, QwenImage), or none (a step-distilled model);
- whether a negative prompt is taken; a request's ``negative_prompt`` for a pipeline that would drop it
  is refused, never ignored;
- the argument that receives the request's ``fps`` (LTX conditions on the frame rate); elsewhere fps
  only sets the container's rate;
- fixed arguments (PixArt's resolution binning is off, so the size asked is the size computed);
- how steps are observed: the step callback, or the denoiser's own calls where a pipeline has none;
- how many latent pixels the pipeline packs into one token on top of the transformer's patch.

A pipeline class missing from the table gets a spec derived from its signature, checked the same way;
one that needs an input besides the prompt (image-to-image, inpainting, control) is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from server.models.limits import Kind

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["CallSpec", "UnservablePipeline", "call_spec", "class_call_spec", "task_call_spec"]

GuidanceKind = Literal["cfg", "embedded", "none"]
StepObserver = Literal["callback", "denoiser"]

# Arguments a text-to-image or text-to-video call never needs: a pipeline whose known spec does not
# list them but that takes one of them is an image-to-X, inpainting or control pipeline.
_CONDITIONING_INPUTS = ("image", "mask_image", "control_image", "video", "control_video", "image_latents")
# What every call passes, whatever the family.
_ALWAYS_PASSED = ("prompt", "height", "width", "num_inference_steps", "generator", "output_type")


class UnservablePipeline(ValueError):
    """A pipeline this server cannot call as its spec says."""


@dataclass(frozen=True)
class CallSpec:
    """How to call one pipeline class with a request's fields."""

    kind: Kind
    # The __call__ argument that gets the request's guidance_scale; None: the model takes no guidance.
    guidance_argument: str | None
    # cfg: one extra denoiser pass per step against the negative (or empty) prompt; embedded: the scale
    # is an input of a guidance-distilled transformer, at no extra cost.
    guidance_kind: GuidanceKind
    negative_prompt: bool
    fps_argument: str | None = None
    fixed_arguments: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    steps_observed_by: StepObserver = "callback"
    # Latent pixels per token side that the pipeline packs on top of the transformer's patch (Flux
    # packs 2x2 latents into one token with a patch of 1; QwenImage's 2x2 packing is its patch).
    packing: int = 1
    # Latent frames the pipeline decodes together: CogVideoX's VAE returns the asked frame count only
    # for an odd number of latent frames, so its clips are 1 + a multiple of 2x the VAE's compression.
    temporal_packing: int = 1
    # Fewer steps than this fail inside the pipeline's scheduler (LTX's terminal shift divides by zero).
    min_steps: int = 1
    # Conditioning inputs this pipeline takes but does not need (Flux2's optional reference images).
    optional_inputs: tuple[str, ...] = ()
    # Conditioning inputs a request fills: an image-conditioned task's pipeline (``image``;
    # ``mask_image`` for inpainting). Empty for text to image or video; a model's own pipeline that
    # lists them (an image-to-video model's) cannot run without them.
    inputs: tuple[str, ...] = ()
    # Whether the task's pipeline starts from the image noised to ``strength`` (image-to-image,
    # inpainting), or takes it as a whole (an edit model's in-context image).
    takes_strength: bool = False
    # The argument that bounds the output's area, where a pipeline rescales to it (Flux Kontext's
    # ``max_area``): it gets the request's width x height, so that the size asked is the size made.
    area_argument: str | None = None
    # The pipeline scales every size to its trained area, keeping only the aspect asked (HiDream): a
    # size it would change is refused.
    fixed_area: bool = False
    # The transformer computes its default size alone (CogVideoX-5b-I2V's positional embeddings are learned
    # for it, and another size fails inside it): another size is refused.
    fixed_size: bool = False
    # Leading frames the pipeline drops from the video it decodes (HunyuanVideo-I2V-33ch drops the first 4):
    # it is asked for that many more, so that the video has the frames requested.
    frames_dropped: int = 0
    # Known variants whose model card says otherwise than the pipeline's signature.
    default_steps: int | None = None
    default_guidance: float | None = None
    default_size: tuple[int, int] | None = None
    default_frames: int | None = None
    default_fps: int | None = None
    # True when the spec comes from the table, False when derived from an unknown pipeline's signature.
    known: bool = True

    @property
    def per_prompt_argument(self) -> str:
        return "num_videos_per_prompt" if self.kind == "video" else "num_images_per_prompt"

    def passed_arguments(self) -> tuple[str, ...]:
        """Every __call__ argument a request can fill."""
        optional = (
            self.guidance_argument,
            "negative_prompt" if self.negative_prompt else None,
            self.fps_argument,
            "num_frames" if self.kind == "video" else None,
            "callback_on_step_end" if self.steps_observed_by == "callback" else None,
            self.per_prompt_argument,
        )
        conditioning = (*self.inputs, *(("strength",) if self.takes_strength else ()), self.area_argument)
        return (
            *_ALWAYS_PASSED,
            *(name for name in (*optional, *conditioning) if name),
            *self.fixed_arguments,
        )


def _image(guidance_argument: str | None, negative_prompt: bool, **kwargs: Any) -> CallSpec:
    kind: GuidanceKind = "cfg" if guidance_argument else "none"
    return CallSpec("image", guidance_argument, kwargs.pop("guidance_kind", kind), negative_prompt, **kwargs)


def _video(guidance_argument: str | None, negative_prompt: bool, **kwargs: Any) -> CallSpec:
    kind: GuidanceKind = "cfg" if guidance_argument else "none"
    return CallSpec("video", guidance_argument, kwargs.pop("guidance_kind", kind), negative_prompt, **kwargs)


# Keyed by pipeline class name. Variants that a config tells apart are resolved in call_spec().
_SPECS: Mapping[str, CallSpec] = MappingProxyType(
    {
        # FLUX.1-dev: guidance embedded in the transformer, no negative prompt (true CFG: see below).
        "FluxPipeline": _image("guidance_scale", False, guidance_kind="embedded", packing=2),
        # An edit model: the request's image, when it has one, is the context it edits, at no strength.
        # The image is taken at its own size, as a request's image is everywhere here: diffusers' auto
        # resize would scale any image to about a megapixel, whatever size the request asks for.
        "FluxKontextPipeline": _image(
            "guidance_scale",
            False,
            guidance_kind="embedded",
            packing=2,
            optional_inputs=("image",),
            area_argument="max_area",
            fixed_arguments=MappingProxyType({"_auto_resize": False}),
        ),
        # An inpainting model (server.models.tasks): FLUX.1 Fill's transformer takes the masked image's
        # latents and the mask beside the noise, so its pipeline needs both.
        "FluxFillPipeline": _image(
            "guidance_scale", False, guidance_kind="embedded", packing=2, inputs=("image", "mask_image")
        ),
        "Flux2Pipeline": _image(
            "guidance_scale", False, guidance_kind="embedded", packing=2, optional_inputs=("image",)
        ),
        # Klein runs CFG against the empty prompt; it takes no negative prompt text.
        "Flux2KleinPipeline": _image("guidance_scale", False, packing=2, optional_inputs=("image",)),
        "QwenImagePipeline": _image("true_cfg_scale", True),
        "StableDiffusion3Pipeline": _image("guidance_scale", True),
        "CogView4Pipeline": _image("guidance_scale", True),
        # Binning would compute a 32x32 request at a 1024x1024 bin and resize: the size asked is the
        # size computed. Its pipeline takes only the old ``callback``.
        "PixArtSigmaPipeline": _image(
            "guidance_scale",
            True,
            fixed_arguments=MappingProxyType({"use_resolution_binning": False}),
            steps_observed_by="denoiser",
        ),
        "PixArtAlphaPipeline": _image(
            "guidance_scale",
            True,
            fixed_arguments=MappingProxyType({"use_resolution_binning": False}),
            steps_observed_by="denoiser",
        ),
        "CogVideoXPipeline": _video("guidance_scale", True, temporal_packing=2),
        "WanPipeline": _video("guidance_scale", True),
        # Image-to-video models (server.models.tasks): their pipeline needs the request's image.
        "CogVideoXImageToVideoPipeline": _video(
            "guidance_scale", True, temporal_packing=2, inputs=("image",)
        ),
        "WanImageToVideoPipeline": _video("guidance_scale", True, inputs=("image",)),
        # HunyuanVideo-I2V: guidance embedded as in the text model (without it, true CFG: see below).
        "HunyuanVideoImageToVideoPipeline": _video(
            "guidance_scale", False, guidance_kind="embedded", inputs=("image",)
        ),
        # guidance_scale is embedded; the negative prompt would need true CFG on top (true_cfg_scale),
        # which the request cannot ask for.
        "HunyuanVideoPipeline": _video("guidance_scale", False, guidance_kind="embedded"),
        "LTXPipeline": _video("guidance_scale", True, fps_argument="frame_rate", min_steps=2),
        # One step divides by zero in its sigma schedule.
        "MochiPipeline": _video("guidance_scale", True, min_steps=2),
        # Guidance is CFG whenever guidance_scale > 0 (cond + s * (cond - uncond)); the transformer
        # patchifies 2x2 latents itself, under a config key (all_patch_size) of its own.
        "ZImagePipeline": _image("guidance_scale", True, packing=2),
        "Lumina2Pipeline": _image("guidance_scale", True),
        # Binning, on by default, would compute at a trained bin and resize, as PixArt's would.
        "SanaPipeline": _image(
            "guidance_scale", True, fixed_arguments=MappingProxyType({"use_resolution_binning": False})
        ),
        # Flux's layout: the pipeline packs 2x2 latents into one token.
        "ChromaPipeline": _image("guidance_scale", True, packing=2),
        "AuraFlowPipeline": _image("guidance_scale", True),
        "CogView3PlusPipeline": _image("guidance_scale", True),
        "SkyReelsV2Pipeline": _video("guidance_scale", True),
        "HiDreamImagePipeline": _image("guidance_scale", True, fixed_area=True),
        # Its guidance is the guider component's, set when the model is made; no step callback.
        "HunyuanVideo15Pipeline": _video(None, True, steps_observed_by="denoiser"),
        "LTX2Pipeline": _video("guidance_scale", True, fps_argument="frame_rate", min_steps=2),
    }
)

KNOWN_PIPELINES: tuple[str, ...] = tuple(_SPECS)


def call_spec(pipeline: DiffusionPipeline) -> CallSpec:
    """The spec to call ``pipeline`` with, checked against its signature; raises UnservablePipeline."""
    name = type(pipeline).__name__
    accepted = inspect.signature(pipeline.__call__).parameters
    spec = _SPECS.get(name)
    if spec is None:
        spec = _derived(name, accepted)
    spec = _variant(name, spec, pipeline)
    _check(name, spec, accepted)
    return spec


def class_call_spec(pipeline_class: type) -> CallSpec:
    """The spec the server would call ``pipeline_class`` with, read from the class alone (a variant its
    configs tell apart is resolved once loaded); raises UnservablePipeline."""
    name = pipeline_class.__name__
    accepted = inspect.signature(pipeline_class.__call__).parameters
    spec = _SPECS.get(name) or _derived(name, accepted)
    _check(name, spec, accepted)
    return spec


def task_call_spec(
    pipeline: DiffusionPipeline, base: CallSpec, inputs: tuple[str, ...], *, strength: bool
) -> CallSpec:
    """The spec of an image-conditioned task's pipeline (built from a served model's components, or the
    model's own edit pipeline): the model's own spec (its guidance, variants and defaults) with the
    task's ``inputs``, and ``strength`` where it starts from the noised image, checked against the task
    pipeline's signature; raises UnservablePipeline."""
    spec = dataclasses.replace(base, inputs=inputs, takes_strength=strength)
    _check(type(pipeline).__name__, spec, inspect.signature(pipeline.__call__).parameters)
    return spec


def _variant(name: str, spec: CallSpec, pipeline: DiffusionPipeline) -> CallSpec:
    config = getattr(getattr(pipeline, "transformer", None), "config", None)
    if name in ("FluxPipeline", "FluxKontextPipeline") and not getattr(config, "guidance_embeds", True):
        # A Flux without guidance embedding (schnell) takes guidance only as true CFG against a
        # negative prompt, one extra pass per step; its card calls for 4 steps and no guidance.
        return dataclasses.replace(
            spec,
            guidance_argument="true_cfg_scale",
            guidance_kind="cfg",
            negative_prompt=True,
            default_steps=4,
            default_guidance=1.0,
        )
    if name == "HunyuanVideoImageToVideoPipeline":
        return _hunyuan_video_i2v(spec, config)
    if name in ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline") and getattr(
        config, "use_learned_positional_embeddings", False
    ):
        return dataclasses.replace(spec, fixed_size=True)
    vae_config = getattr(getattr(pipeline, "vae", None), "config", None)
    if name in ("WanPipeline", "WanImageToVideoPipeline") and getattr(vae_config, "z_dim", None) == 48:
        # Wan 2.2 TI2V 5B, text or image to video (its 16x VAE has 48 channels): 121 frames of 1280x704 at
        # 24 fps.
        return dataclasses.replace(spec, default_size=(1280, 704), default_frames=121, default_fps=24)
    if name == "Flux2KleinPipeline" and getattr(pipeline, "config", {}).get("is_distilled", False):
        # Step-distilled Klein ignores guidance_scale; asking for it is refused rather than dropped.
        return dataclasses.replace(spec, guidance_argument=None, guidance_kind="none")
    return spec


def _hunyuan_video_i2v(spec: CallSpec, config: Any) -> CallSpec:
    """HunyuanVideo-I2V (``token_replace``, guidance embedded) or HunyuanVideo-I2V-33ch (``latent_concat``),
    told apart by the transformer's config."""
    if not getattr(config, "guidance_embeds", True):
        # Without guidance embedding (the 33ch checkpoint), guidance_scale reaches nothing: the request's
        # guidance is true CFG against a negative prompt, one extra pass per step.
        spec = dataclasses.replace(
            spec, guidance_argument="true_cfg_scale", guidance_kind="cfg", negative_prompt=True
        )
    if getattr(config, "image_condition_type", None) == "latent_concat":
        # The pipeline cuts the first 4 decoded frames (video[:, :, 4:]), whatever the VAE's compression.
        spec = dataclasses.replace(spec, frames_dropped=4)
    return spec


# A pipeline that takes images is served only as a task or model whose inputs are tested (docs/edits.md).
_UNTESTED_CONDITIONING = (
    "{name} takes {needs}: of the image-conditioned pipelines, only the tasks and models listed in "
    "docs/edits.md are served"
)


def _derived(name: str, accepted: Mapping[str, inspect.Parameter]) -> CallSpec:
    """A spec for a pipeline class the table does not know, read from what its __call__ takes."""
    needs = [input_name for input_name in _CONDITIONING_INPUTS if input_name in accepted]
    if needs:
        raise UnservablePipeline(_UNTESTED_CONDITIONING.format(name=name, needs=", ".join(needs)))
    guidance = next((arg for arg in ("true_cfg_scale", "guidance_scale") if arg in accepted), None)
    return CallSpec(
        kind="video" if "num_frames" in accepted else "image",
        guidance_argument=guidance,
        guidance_kind="cfg" if guidance else "none",
        negative_prompt="negative_prompt" in accepted,
        steps_observed_by="callback" if "callback_on_step_end" in accepted else "denoiser",
        known=False,
    )


def _check(name: str, spec: CallSpec, accepted: Mapping[str, inspect.Parameter]) -> None:
    missing = [arg for arg in spec.passed_arguments() if arg not in accepted]
    if missing:
        raise UnservablePipeline(f"{name} does not take {', '.join(missing)}, which its call spec passes")
    needs = [
        arg
        for arg in _CONDITIONING_INPUTS
        if arg in accepted and arg not in spec.optional_inputs and arg not in spec.inputs
    ]
    if needs:
        raise UnservablePipeline(_UNTESTED_CONDITIONING.format(name=name, needs=", ".join(needs)))
