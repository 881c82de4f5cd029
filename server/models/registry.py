"""The registry of resident pipelines: load one from a name, a folder or a hub id, and describe it.

``load_model(spec)`` accepts a built-in name (``BUILTIN_MODEL_NAMES``), a local folder written by
``save_pretrained``, or a hub id (``org/name``). All three go through diffusers' own
``DiffusionPipeline.from_pretrained``; built-ins are first built into a folder under ``cache_dir``.

How a pipeline is called comes from its call spec (``server.models.call_specs``), checked at load: a
pipeline the server cannot call as a text-to-image or text-to-video model is refused here, never
served wrong. Its geometry and defaults come from the pipeline and its configs (``server.models.geometry``),
its cache presets from the table here, keyed by the transformer family that ``cache_engine``
recognises. Built-in models bring their own defaults, limits, call kwargs and measured presets.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from server.models import geometry
from server.models.adapters import DEFAULT_FOLD_BYTES, Adapters
from server.models.builtin import BUILTIN_MODEL_NAMES, BUILTIN_MODELS, BuiltinModel, materialize
from server.models.caching import ModelCache
from server.models.calibration import Calibration, load_calibration
from server.models.call_specs import CallSpec, UnservablePipeline, call_spec
from server.models.limits import Kind, ModelDefaults, ModelLimits
from server.models.presets import PRESET_NAMES
from server.models.prompt_cache import PromptCache
from server.models.shared_components import serialize_shared_components
from server.models.stages import StageProbe
from server.models.tasks import Task, TaskPipeline, image_tasks, text_tasks
from server.models.trajectories import DEFAULT_RULE, TrajectoryProbe, TrajectoryStore, resumable
from server.ops import acceleration
from server.ops.acceleration import Acceleration

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    from cache_engine import CacheConfig

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
    # The spec the operator gave (builtin:NAME, local:PATH as given, hub:ID), not where it is kept.
    source: str
    pipeline: DiffusionPipeline
    call_spec: CallSpec
    # One cache engine per transformer of the pipeline; none when the server runs without cache hooks.
    cache: ModelCache
    stages: StageProbe
    defaults: ModelDefaults
    limits: ModelLimits
    # Keyed by PRESET_NAMES. A preset whose method this model cannot run is left out, so that asking
    # for it is an error rather than a silently uncached run.
    presets: Mapping[str, CacheConfig | None]
    # Fixed extra pipeline kwargs the model needs on every call, e.g. {"max_sequence_length": 16}.
    call_kwargs: Mapping[str, Any]
    # Width and height must be multiples of this (VAE downsampling times the transformer's patch).
    size_multiple: int = 8
    # Videos: num_frames - 1 must be a multiple of this (the VAE's temporal compression).
    frame_step: int = 1
    # Measured curves for ``target`` requests, and per-checkpoint values by method and config field
    # (e.g. {"mag_cache": {"mag_ratios": (...)}}) that fill what a request leaves out. Empty unless the
    # model ships one or ``ditcache calibrate`` wrote one.
    calibration: Calibration = field(default_factory=lambda: Calibration(model="", prompts=0))
    # Bytes of the transformers' weights as served: quantized, they are what a host sizes memory by.
    weight_bytes: int = 0
    # What was done to the transformers at load (compiled blocks, quantized weights, attention backend).
    acceleration: Acceleration = field(default_factory=Acceleration)
    # Its image-conditioned tasks, each a pipeline built from these components (server.models.tasks).
    tasks: Mapping[Task, TaskPipeline] = field(default_factory=dict)
    # Prompt embeddings kept across requests; None: every request runs its text encoders.
    prompt_cache: PromptCache | None = None
    # LoRA adapters, chosen per request; None: the pipeline takes none.
    adapters: Adapters | None = None
    # Trajectories kept for similar later prompts, and what resumes one; None: none are kept.
    trajectories: TrajectoryStore | None = None
    trajectory_probe: TrajectoryProbe | None = None
    # Where `ditcache calibrate --lora` writes the calibrations of this model with an adapter applied.
    cache_dir: Path | None = None

    def adapter_calibration(self, loras: tuple[tuple[str, float], ...]) -> Calibration | None:
        """The calibration measured with exactly ``loras`` (one adapter, at its scale), if the operator
        ran ``ditcache calibrate --lora`` for it; None otherwise."""
        if (
            len(loras) != 1
            or self.cache_dir is None
            or self.adapters is None
            or loras[0][0] not in self.adapters
        ):
            return None
        path = calibration_path(self.cache_dir, self.name, loras[0][0])
        try:
            found = _read_calibration(path, path.stat().st_mtime_ns)
        except FileNotFoundError:
            return None
        return found if found is not None and found.adapter == loras[0] else None

    @property
    def task_names(self) -> tuple[Task, ...]:
        """What the model does: text to image or video (unless its pipeline needs an image), then its
        image-conditioned tasks."""
        return (*text_tasks(self.kind, self.call_spec), *self.tasks)

    def task_pipeline(self, task: Task) -> TaskPipeline:
        """The pipeline and call spec of ``task``; raises KeyError for a task the model lacks."""
        if task in text_tasks(self.kind, self.call_spec):
            return TaskPipeline(task, self.pipeline, self.call_spec)
        return self.tasks[task]

    @property
    def supported_methods(self) -> tuple[str, ...]:
        return self.cache.supported_methods

    @functools.cached_property
    def method_values(self) -> Mapping[str, Mapping[str, Any]]:
        """Per method, the values this model gives the fields a request leaves out: where the reference
        default cannot act here (DBCache's front blocks on a small model), and what its calibration
        measured per checkpoint (MagCache's ``mag_ratios``), which wins where both speak. Worked out
        once: every request reads it, and neither the engines nor the calibration change once loaded."""
        values: dict[str, dict[str, Any]] = {}
        for method in self.supported_methods:
            fitted = {**self.cache.fitted_defaults(method), **self.calibration.method_values.get(method, {})}
            if fitted:
                values[method] = fitted
        return values


# -- per-family knowledge -------------------------------------------------------------------------------


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
    from server.models.presets import taylorseer_lite

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
    family: str, kind: Kind, cache: ModelCache, measured: Mapping[str, CacheConfig] | None = None
) -> Mapping[str, CacheConfig | None]:
    presets: dict[str, CacheConfig | None] = {}
    for name, config in (measured or _presets_table(family, kind)).items():
        try:
            cache.check(config)
        except ValueError as exc:
            logger.warning("cache preset %r is unavailable on this %s model: %s", name, family, exc)
        else:
            presets[name] = config
    return MappingProxyType(presets)


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
        return builtin.name, f"builtin:{builtin.name}", _from_pretrained(str(folder), torch_dtype, local=True)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return folder.resolve().name, f"local:{spec}", _from_pretrained(str(folder), torch_dtype, local=True)
    if _HUB_ID.fullmatch(spec):
        return spec, f"hub:{spec}", _from_pretrained(spec, torch_dtype, local=False)
    raise ModelLoadError(
        f"{spec!r} is not a built-in model ({', '.join(BUILTIN_MODEL_NAMES)}), "
        "an existing folder or a hub id (org/name)"
    )


def own_memory(pipeline: DiffusionPipeline) -> None:
    """Copy weights that still live in the memory-mapped checkpoint into memory of their own.

    CPU kernels round differently on data that is not 64-byte aligned, and a mapped tensor sits where
    the file put it: two loads of one folder could then differ in the last bit. Copies are aligned.
    """
    with torch.no_grad():
        for module in pipeline.components.values():
            if not isinstance(module, nn.Module):
                continue
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()


CALIBRATION_FILE = "calibration.json"


@functools.lru_cache(maxsize=64)
def _read_calibration(path: Path, mtime_ns: int) -> Calibration | None:
    """The calibration at ``path`` as of ``mtime_ns``: read once per version of the file."""
    try:
        return load_calibration(path)
    except ValueError:
        logger.warning("could not read %s; requests with its adapter are outside calibration", path)
        return None


def calibration_path(cache_dir: Path, name: str, adapter: str | None = None) -> Path:
    """Where ``ditcache calibrate`` writes a model's calibration (with ``adapter``: the model's with that
    LoRA adapter applied), and where the server looks first."""
    return cache_dir / "calibrations" / (f"{name}.json" if adapter is None else f"{name}+{adapter}.json")


def _calibration(name: str, spec: str, builtin: BuiltinModel | None, cache_dir: Path) -> Calibration:
    """The operator's calibration if there is one, else the one shipped in the model's folder."""
    folder = builtin.folder if builtin is not None else Path(spec).expanduser()
    for path in (calibration_path(cache_dir, name), (folder / CALIBRATION_FILE) if folder else None):
        if path is not None and path.is_file():
            try:
                return load_calibration(path)
            except ValueError as exc:
                raise ModelLoadError(str(exc)) from exc
    return Calibration(model=name, prompts=0)


def _denoisers(pipeline: DiffusionPipeline) -> list[nn.Module]:
    """Every transformer the pipeline holds (``transformer``, and Wan 2.2's ``transformer_2``)."""
    return [
        module
        for name, module in pipeline.components.items()
        if (name == "transformer" or name.startswith("transformer_")) and isinstance(module, nn.Module)
    ]


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Path,
    cache_hooks: bool = True,
    accelerate: Acceleration | None = None,
    text_cache_bytes: int = 0,
    trajectory_cache_bytes: int = 0,
    lora_fold_bytes: int = DEFAULT_FOLD_BYTES,
) -> ResidentModel:
    """Load ``spec`` onto ``device`` with a cache engine per transformer; raises ModelLoadError.

    ``cache_hooks=False`` serves the pipeline exactly as diffusers ships it (no engine, method "none").
    ``accelerate`` compiles, quantizes or changes the attention backend of the transformers, before
    the engines wrap them (``server.ops.acceleration``); compiled models still need a warm-up.
    ``text_cache_bytes`` bounds the prompt embeddings kept across requests (0: none are kept), and
    ``trajectory_cache_bytes`` the trajectories kept for similar prompts (0, or a pipeline that cannot
    resume one: none are kept). ``lora_fold_bytes`` bounds the weights one request with adapters may
    fold them into (``server.models.adapters``).
    """
    from cache_engine import CacheEngine
    from cache_engine.targets import build_layout, family_for

    torch_dtype = _DTYPES.get(dtype)
    if torch_dtype is None:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    builtin = BUILTIN_MODELS.get(spec)
    name, source, pipeline = _resolve(spec, builtin, torch_dtype, cache_dir)
    denoisers = _denoisers(pipeline)
    if not denoisers or not isinstance(getattr(pipeline, "transformer", None), nn.Module):
        raise ModelLoadError(
            f"{spec!r} loads as {type(pipeline).__name__}, which has no transformer; "
            "only diffusion transformer pipelines are served"
        )
    try:
        spec_of_call = call_spec(pipeline)
    except UnservablePipeline as exc:
        raise ModelLoadError(f"{spec!r} cannot be served: {exc}") from exc
    try:
        pipeline.to(device)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"could not move {spec!r} to device {device!r}: {exc}") from exc
    own_memory(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    if builtin is not None and builtin.sample_size is not None:
        pipeline.default_sample_size = builtin.sample_size

    family = family_for(denoisers[0]).name
    kind = spec_of_call.kind
    accelerate = accelerate or Acceleration()
    if accelerate.active:
        try:
            acceleration.apply(
                denoisers,
                lambda denoiser: [site.module for site in build_layout(denoiser).blocks],
                lambda denoiser: [site.module for site in build_layout(denoiser).attention],
                accelerate,
                device=device,
                dtype=torch_dtype,
            )
        except acceleration.AccelerationError as exc:
            raise ModelLoadError(f"{spec!r}: {exc}") from exc
    cache = ModelCache([CacheEngine(denoiser) for denoiser in denoisers] if cache_hooks else [])
    if accelerate.compile:
        for denoiser in denoisers:
            acceleration.seal(denoiser)
    defaults = builtin.defaults if builtin else geometry.defaults(pipeline, spec_of_call)
    try:
        tasks = image_tasks(pipeline, spec_of_call)
    except UnservablePipeline as exc:
        raise ModelLoadError(f"{spec!r} cannot be served: {exc}") from exc
    prompt_cache = PromptCache(text_cache_bytes) if text_cache_bytes > 0 else None
    pipelines = [pipeline, *(task.pipeline for task in tasks.values() if task.pipeline is not pipeline)]
    for each in pipelines:
        # The generations running at once on this copy (--max-batch) share its tokenizers and autoencoders.
        serialize_shared_components(each)
    if prompt_cache is not None:
        # Under the stage timing, which then counts a hit's time as the encoding it replaced.
        for each in pipelines:
            prompt_cache.attach(each)
    stages = StageProbe(pipeline, denoisers, spec_of_call.steps_observed_by)
    for each in pipelines[1:]:
        stages.attach(each)
    calibration = _calibration(name, spec, builtin, cache_dir)
    trajectories, trajectory_probe = None, None
    if trajectory_cache_bytes > 0 and resumable(pipeline, spec_of_call.steps_observed_by):
        # Outside the cache engines' dispatch: a skipped step never reaches a request's policy.
        trajectories = TrajectoryStore(trajectory_cache_bytes, calibration.trajectory_rule or DEFAULT_RULE)
        trajectory_probe = TrajectoryProbe(pipeline, denoisers)
    return ResidentModel(
        name=name,
        kind=kind,
        family=family,
        source=source,
        pipeline=pipeline,
        call_spec=spec_of_call,
        cache=cache,
        stages=stages,
        defaults=defaults,
        limits=builtin.limits if builtin else geometry.limits(defaults, kind),
        presets=_presets(family, kind, cache, builtin.presets() if builtin and builtin.presets else None),
        call_kwargs=builtin.call_kwargs if builtin else MappingProxyType({}),
        calibration=calibration,
        cache_dir=cache_dir,
        size_multiple=geometry.size_multiple(pipeline, spec_of_call),
        frame_step=geometry.frame_step(pipeline, spec_of_call) if kind == "video" else 1,
        weight_bytes=sum(acceleration.weight_bytes(denoiser) for denoiser in denoisers),
        acceleration=accelerate,
        tasks=tasks,
        prompt_cache=prompt_cache,
        adapters=Adapters(pipeline, fold_bytes=lora_fold_bytes)
        if hasattr(type(pipeline), "lora_state_dict")
        else None,
        trajectories=trajectories,
        trajectory_probe=trajectory_probe,
    )
