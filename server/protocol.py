"""Wire models: what clients send and what they get back.

Requests are strict (no "5" for 5), forbid unknown keys and bound every field, so a request that
reaches the worker is well formed; what depends on the model (its limits, its cache methods) is
checked in ``runtime/service.py``. Cache policies carry the engine config's parameter names, defaults and
descriptions (taken from the config, where each field is documented once); callbacks and the
model-structure fields (block identifiers, tensor format, guidance distillation) are left out
(``NOT_ON_THE_WIRE``) because the engine knows them per model family and a client should not have to.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from cache_engine import (
    DBCacheConfig,
    FasterCacheConfig,
    FirstBlockCacheConfig,
    GuardedTaylorSeerCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TeaCacheConfig,
)
from server.models.limits import Kind, ModelDefaults, ModelLimits
from server.models.presets import PRESET_NAMES, PresetName
from server.models.tasks import Task
from server.ops.dtypes import dtype_name

CACHE_METHODS: tuple[str, ...] = (
    "none",
    "pyramid_attention_broadcast",
    "faster_cache",
    "first_block_cache",
    "taylorseer",
    "mag_cache",
    "sea_cache",
    "dbcache",
    "teacache",
    "guarded_taylorseer",
)
ImageFormat = Literal["png", "jpeg", "webp"]
OutputFormat = Literal["png", "jpeg", "webp", "mp4", "gif"]

MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**63 - 1


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- cache policies ----------------------------------------------------------------------------------


def _list_to_tuple(value: Any) -> Any:
    # JSON has no tuples, and strict validation of a parsed body would refuse the list.
    return tuple(value) if isinstance(value, list) else value


# A (low, high) pair of timesteps on the 0..1000 scale; a 2-element list in JSON.
TimestepRange = Annotated[tuple[float, float], BeforeValidator(_list_to_tuple)]
SkipRange = Annotated[int, Field(ge=1, le=1000)]


def _engine(config: type, name: str, *, note: str | None = None, **bounds: Any) -> Any:
    """The wire field ``name`` of an engine config: the config's default and description (the one place
    a field is documented), with the wire's bounds; ``note`` adds what the server does with it."""
    field = {field.name: field for field in dataclasses.fields(config)}[name]
    default = dtype_name(field.default) if isinstance(field.default, torch.dtype) else field.default
    doc = field.metadata.get("doc")
    description = doc if note is None else f"{doc} ({note})" if doc else note
    return Field(default=default, description=description, **bounds)


# The config fields a client cannot set: callbacks, and what the engine knows per model family (block
# identifiers, tensor format, guidance distillation, its reference's private input names), or runs
# that measure rather than cache (calibrate: ``ditcache calibrate`` runs those).
NOT_ON_THE_WIRE: dict[str, frozenset[str]] = {
    "pyramid_attention_broadcast": frozenset(
        {
            "spatial_attention_block_identifiers",
            "temporal_attention_block_identifiers",
            "cross_attention_block_identifiers",
            "current_timestep_callback",
        }
    ),
    "faster_cache": frozenset(
        {
            "spatial_attention_block_identifiers",
            "temporal_attention_block_identifiers",
            "attention_weight_callback",
            "low_frequency_weight_callback",
            "high_frequency_weight_callback",
            "tensor_format",
            "is_guidance_distilled",
            "current_timestep_callback",
            "_unconditional_conditional_input_kwargs_identifiers",
        }
    ),
    "first_block_cache": frozenset(),
    "taylorseer": frozenset({"skip_predict_identifiers", "cache_identifiers"}),
    "mag_cache": frozenset({"calibrate"}),
    "sea_cache": frozenset({"raw_vision_callback"}),
    "dbcache": frozenset(),
    "teacache": frozenset({"calibrate"}),
    "guarded_taylorseer": frozenset(),
}


class NoCache(Request):
    method: Literal["none"]


_PAB = PyramidAttentionBroadcastConfig


class PyramidAttentionBroadcast(Request):
    method: Literal["pyramid_attention_broadcast"]
    spatial_attention_block_skip_range: SkipRange | None = _engine(_PAB, "spatial_attention_block_skip_range")
    temporal_attention_block_skip_range: SkipRange | None = _engine(
        _PAB, "temporal_attention_block_skip_range"
    )
    cross_attention_block_skip_range: SkipRange | None = _engine(_PAB, "cross_attention_block_skip_range")
    spatial_attention_timestep_skip_range: TimestepRange = _engine(
        _PAB, "spatial_attention_timestep_skip_range"
    )
    temporal_attention_timestep_skip_range: TimestepRange = _engine(
        _PAB, "temporal_attention_timestep_skip_range"
    )
    cross_attention_timestep_skip_range: TimestepRange = _engine(_PAB, "cross_attention_timestep_skip_range")


_FASTER = FasterCacheConfig


class FasterCache(Request):
    method: Literal["faster_cache"]
    spatial_attention_block_skip_range: SkipRange = _engine(_FASTER, "spatial_attention_block_skip_range")
    temporal_attention_block_skip_range: SkipRange | None = _engine(
        _FASTER, "temporal_attention_block_skip_range"
    )
    spatial_attention_timestep_skip_range: TimestepRange = _engine(
        _FASTER, "spatial_attention_timestep_skip_range"
    )
    temporal_attention_timestep_skip_range: TimestepRange = _engine(
        _FASTER, "temporal_attention_timestep_skip_range"
    )
    low_frequency_weight_update_timestep_range: TimestepRange = _engine(
        _FASTER, "low_frequency_weight_update_timestep_range"
    )
    high_frequency_weight_update_timestep_range: TimestepRange = _engine(
        _FASTER, "high_frequency_weight_update_timestep_range"
    )
    alpha_low_frequency: float = _engine(_FASTER, "alpha_low_frequency", ge=0, le=10)
    alpha_high_frequency: float = _engine(_FASTER, "alpha_high_frequency", ge=0, le=10)
    unconditional_batch_skip_range: SkipRange = _engine(_FASTER, "unconditional_batch_skip_range")
    unconditional_batch_timestep_skip_range: TimestepRange = _engine(
        _FASTER, "unconditional_batch_timestep_skip_range"
    )


class FirstBlockCache(Request):
    method: Literal["first_block_cache"]
    threshold: float = _engine(FirstBlockCacheConfig, "threshold", ge=0, le=10)


_TAYLOR = TaylorSeerCacheConfig


class TaylorSeer(Request):
    method: Literal["taylorseer"]
    cache_interval: SkipRange = _engine(_TAYLOR, "cache_interval")
    disable_cache_before_step: int = _engine(_TAYLOR, "disable_cache_before_step", ge=0, le=1000)
    disable_cache_after_step: int | None = _engine(_TAYLOR, "disable_cache_after_step", ge=0, le=1000)
    max_order: int = _engine(_TAYLOR, "max_order", ge=0, le=4)
    taylor_factors_dtype: Literal["bfloat16", "float16", "float32"] = _engine(
        _TAYLOR, "taylor_factors_dtype", note="named without its module: float32, not torch.float32"
    )
    use_lite_mode: bool = _engine(_TAYLOR, "use_lite_mode")


# MagCache's magnitude ratios, one per step of the checkpoint's calibration run; a list in JSON.
MagRatios = Annotated[
    tuple[Annotated[float, Field(ge=0, le=100)], ...],
    BeforeValidator(_list_to_tuple),
    Field(min_length=1, max_length=1000),
]


class MagCache(Request):
    method: Literal["mag_cache"]
    threshold: float = _engine(MagCacheConfig, "threshold", ge=0, le=10)
    max_skip_steps: int = _engine(MagCacheConfig, "max_skip_steps", ge=0, le=1000)
    retention_ratio: float = _engine(MagCacheConfig, "retention_ratio", ge=0, le=1)
    num_inference_steps: int = _engine(
        MagCacheConfig, "num_inference_steps", ge=1, le=1000, note="default here: the request's steps"
    )
    mag_ratios: MagRatios | None = _engine(
        MagCacheConfig, "mag_ratios", note="default here: the model's calibrated ratios, if it has any"
    )


class SeaCache(Request):
    method: Literal["sea_cache"]
    threshold: float = _engine(SeaCacheConfig, "threshold", ge=0, le=10)
    residual_order: int = _engine(SeaCacheConfig, "residual_order", ge=0, le=1)
    retention_steps: int = _engine(SeaCacheConfig, "retention_steps", ge=0, le=1000)
    cache_end_steps: int = _engine(SeaCacheConfig, "cache_end_steps", ge=0, le=1000)
    max_consecutive_cached: int = _engine(SeaCacheConfig, "max_consecutive_cached", ge=0, le=1000)
    power_exp: float = _engine(SeaCacheConfig, "power_exp", gt=0, le=100)
    num_inference_steps: int | None = _engine(
        SeaCacheConfig, "num_inference_steps", ge=1, le=1000, note="default here: the request's steps"
    )


# DBCache's static compute mask: one 0 or 1 per step; a list in JSON.
StepsMask = Annotated[
    tuple[Annotated[int, Field(ge=0, le=1)], ...],
    BeforeValidator(_list_to_tuple),
    Field(min_length=1, max_length=1000),
]


class DBCache(Request):
    """cache-dit's Dual Block Cache, with cache-dit's parameter names."""

    method: Literal["dbcache"]
    Fn_compute_blocks: int = _engine(
        DBCacheConfig,
        "Fn_compute_blocks",
        ge=1,
        le=1000,
        note="default here on a model whose chain of blocks is 8 or shorter: 1, see the model's method_defaults",
    )
    Bn_compute_blocks: int = _engine(DBCacheConfig, "Bn_compute_blocks", ge=0, le=1000)
    residual_diff_threshold: float = _engine(DBCacheConfig, "residual_diff_threshold", ge=0, le=10)
    max_accumulated_residual_diff_threshold: float | None = _engine(
        DBCacheConfig, "max_accumulated_residual_diff_threshold", ge=0, le=1000
    )
    max_warmup_steps: int = _engine(DBCacheConfig, "max_warmup_steps", ge=0, le=1000)
    warmup_interval: int = _engine(DBCacheConfig, "warmup_interval", ge=1, le=1000)
    max_cached_steps: int = _engine(DBCacheConfig, "max_cached_steps", ge=-1, le=1000)
    max_continuous_cached_steps: int = _engine(DBCacheConfig, "max_continuous_cached_steps", ge=-1, le=1000)
    steps_computation_mask: StepsMask | None = _engine(DBCacheConfig, "steps_computation_mask")
    steps_computation_policy: Literal["dynamic", "static"] = _engine(
        DBCacheConfig, "steps_computation_policy"
    )
    enable_taylorseer: bool = _engine(DBCacheConfig, "enable_taylorseer")
    taylorseer_order: int = _engine(DBCacheConfig, "taylorseer_order", ge=1, le=2)


# TeaCache's rescaling polynomial, highest power first; a list in JSON.
Coefficients = Annotated[
    tuple[Annotated[float, Field(allow_inf_nan=False)], ...],
    BeforeValidator(_list_to_tuple),
    Field(min_length=1, max_length=16),
]


class TeaCache(Request):
    method: Literal["teacache"]
    rel_l1_thresh: float = _engine(TeaCacheConfig, "rel_l1_thresh", ge=0, le=10)
    coefficients: Coefficients | None = _engine(
        TeaCacheConfig,
        "coefficients",
        note="default here: the model's calibrated ones, else the paper's for its family",
    )
    num_steps: int | None = _engine(
        TeaCacheConfig, "num_steps", ge=1, le=1000, note="default here: the request's steps"
    )


_GUARDED = GuardedTaylorSeerCacheConfig


class GuardedTaylorSeer(Request):
    method: Literal["guarded_taylorseer"]
    step_tolerance: float = _engine(_GUARDED, "step_tolerance", ge=0, le=100)
    error_budget: float | None = _engine(_GUARDED, "error_budget", ge=0, le=1000)
    max_interval: SkipRange = _engine(_GUARDED, "max_interval")
    disable_cache_before_step: int = _engine(_GUARDED, "disable_cache_before_step", ge=0, le=1000)
    max_order: int = _engine(_GUARDED, "max_order", ge=0, le=4)
    taylor_factors_dtype: Literal["bfloat16", "float16", "float32"] = _engine(
        _GUARDED, "taylor_factors_dtype", note="named without its module: float32, not torch.float32"
    )


class CachePreset(Request):
    preset: PresetName


class QualityTarget(Request):
    min_psnr: float = Field(
        ge=0, le=100, description="pooled PSNR in dB, against the uncached output, that the policy must keep"
    )


class CacheTarget(Request):
    """The fastest policy the model's calibration measured at or above the floor."""

    target: QualityTarget


CachePolicy = (
    NoCache
    | PyramidAttentionBroadcast
    | FasterCache
    | FirstBlockCache
    | TaylorSeer
    | MagCache
    | SeaCache
    | DBCache
    | TeaCache
    | GuardedTaylorSeer
)
POLICY_CLASSES: dict[str, type[CachePolicy]] = {
    "none": NoCache,
    "pyramid_attention_broadcast": PyramidAttentionBroadcast,
    "faster_cache": FasterCache,
    "first_block_cache": FirstBlockCache,
    "taylorseer": TaylorSeer,
    "mag_cache": MagCache,
    "sea_cache": SeaCache,
    "dbcache": DBCache,
    "teacache": TeaCache,
    "guarded_taylorseer": GuardedTaylorSeer,
}
_PRESET_TAG = "preset"
_TARGET_TAG = "target"
_SELECTORS = ("method", _PRESET_TAG, _TARGET_TAG)


def _check_cache_selector(value: Any) -> Any:
    # Runs before the union so that a missing or unknown method gets a message naming it instead of
    # pydantic's generic "unable to extract tag".
    if not isinstance(value, dict):
        return value
    given = [key for key in _SELECTORS if key in value]
    if len(given) > 1:
        raise PydanticCustomError(
            "cache_selector",
            "give one of 'method', 'preset' or 'target', not {given}",
            {"given": " and ".join(given)},
        )
    if not given:
        raise PydanticCustomError(
            "cache_selector",
            "cache needs a 'method' ({methods}), a 'preset' ({presets}) or a 'target' (a min_psnr in dB)",
            {"methods": ", ".join(CACHE_METHODS), "presets": ", ".join(PRESET_NAMES)},
        )
    if "method" in value and value["method"] not in CACHE_METHODS:
        raise PydanticCustomError(
            "unknown_cache_method",
            "unknown cache method '{method}'; expected one of: {methods}",
            {"method": value["method"], "methods": ", ".join(CACHE_METHODS)},
        )
    return value


def _cache_tag(value: Any) -> str:
    if isinstance(value, dict):
        return _TARGET_TAG if _TARGET_TAG in value else str(value.get("method", _PRESET_TAG))
    if isinstance(value, CacheTarget):
        return _TARGET_TAG
    return str(getattr(value, "method", _PRESET_TAG))


CacheSpec = Annotated[
    Annotated[NoCache, Tag("none")]
    | Annotated[PyramidAttentionBroadcast, Tag("pyramid_attention_broadcast")]
    | Annotated[FasterCache, Tag("faster_cache")]
    | Annotated[FirstBlockCache, Tag("first_block_cache")]
    | Annotated[TaylorSeer, Tag("taylorseer")]
    | Annotated[MagCache, Tag("mag_cache")]
    | Annotated[SeaCache, Tag("sea_cache")]
    | Annotated[DBCache, Tag("dbcache")]
    | Annotated[TeaCache, Tag("teacache")]
    | Annotated[GuardedTaylorSeer, Tag("guarded_taylorseer")]
    | Annotated[CachePreset, Tag(_PRESET_TAG)]
    | Annotated[CacheTarget, Tag(_TARGET_TAG)],
    Discriminator(_cache_tag),
    BeforeValidator(_check_cache_selector),
]

# Validation errors whose location is the cache object but whose culprit is one key inside it.
_ERROR_KEY: dict[str, str] = {"unknown_cache_method": "method"}


def field_path(loc: Sequence[int | str], error_type: str = "") -> str:
    """``("body", "cache", "taylorseer", "max_order")`` → ``"cache.max_order"``.

    Drops the request part and the union tags pydantic inserts, which are not keys the client wrote.
    """
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    kept: list[str] = []
    for i, part in enumerate(parts):
        if (
            i > 0
            and parts[i - 1] == "cache"
            and (part in POLICY_CLASSES or part in (_PRESET_TAG, _TARGET_TAG))
        ):
            continue
        if i > 0 and parts[i - 1] == "reuse" and part in (_REUSE_WORD, _REUSE_OBJECT):
            continue
        kept.append(part)
    if error_type in _ERROR_KEY:
        kept.append(_ERROR_KEY[error_type])
    return ".".join(kept)


# -- generation requests -----------------------------------------------------------------------------


class LoraChoice(Request):
    name: str = Field(min_length=1, max_length=256, description="an adapter the model's card lists")
    scale: float = Field(default=1.0, ge=-8, le=8, description="its weight (1: as trained)")


class SimilarKnobs(Request):
    min_similarity: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="a floor of your own under which the request starts from noise: the cosine similarity of "
        "the prompts' text embeddings (default: the model's calibrated rule alone decides)",
    )
    max_skipped_steps: int | None = Field(
        default=None, ge=0, description="skip at most this many steps (default: as many as the rule allows)"
    )


class SimilarReuse(Request):
    similar: SimilarKnobs = Field(
        description="start from the kept latents of the most similar earlier prompt (same model, size, frames, "
        "steps, guidance, negative prompt, n, adapters), skipping as many steps as the model's rule allows "
        "for their similarity; the request keeps its own for later ones. Its seed is then the earlier "
        "request's noise"
    )


# The two shapes "reuse" takes, told apart before validation so that an error names the field the client
# wrote ("reuse.similar.min_similarity"), not every shape it might have meant.
_REUSE_WORD, _REUSE_OBJECT = "reuse_word", "reuse_object"


def _reuse_shape(value: Any) -> str:
    return _REUSE_OBJECT if isinstance(value, (dict, SimilarReuse)) else _REUSE_WORD


Reuse = Annotated[
    Annotated[Literal["none", "exact"], Tag(_REUSE_WORD)] | Annotated[SimilarReuse, Tag(_REUSE_OBJECT)],
    Discriminator(_reuse_shape),
]


class _GenerationFields(Request):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(
        default=None, min_length=1, max_length=256, description="default: first resident"
    )
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(
        default=None, ge=0, le=MAX_SEED, description="default: drawn at random, returned"
    )
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    cache: CacheSpec | None = Field(default=None, description="default: no caching")
    loras: list[LoraChoice] = Field(
        default_factory=list,
        max_length=32,
        description="LoRA adapters of the model, by name, applied in this order for this request only",
    )
    reuse: Reuse = Field(
        default="none",
        description="exact: an identical earlier request's result may answer this one, the very same bytes "
        "(same model, fields, seed, image, policy; a request without a seed never matches); "
        '{"similar": {...}}: start from a similar earlier prompt\'s trajectory (text to image or video); '
        "none: always computed from noise",
    )


class GenerationRequest(_GenerationFields):
    """``POST /v1/generations`` and ``POST /v1/jobs``: images and videos."""

    width: int | None = Field(default=None, ge=8, le=8192)
    height: int | None = Field(default=None, ge=8, le=8192)
    num_frames: int | None = Field(default=None, ge=1, le=1024, description="videos only")
    fps: int | None = Field(default=None, ge=1, le=120, description="videos only")
    output_format: OutputFormat | None = Field(
        default=None,
        description="images: png, jpeg, webp (default png); videos: mp4, gif, webp (default mp4)",
    )
    image: str | list[str] | None = Field(
        default=None,
        description="an image to start from (image-to-image; inpainting with a mask): PNG, JPEG or WebP, "
        "base64 or a data URL, a list where the model's pipeline takes several. Sets the size "
        "unless width and height are given (down to the model's size multiple)",
    )
    mask: str | None = Field(
        default=None,
        description="inpainting: a PNG of the image's size whose transparent pixels are the ones to "
        "change (OpenAI's convention), base64 or a data URL",
    )
    strength: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="with an image: how far from it to go, 1 repainting it whole (default 0.6); "
        "the pipeline runs strength x steps of the steps",
    )


class ImageGenerationRequest(_GenerationFields):
    """``POST /v1/images/generations``: the OpenAI Images request, plus our fields."""

    size: str | None = Field(
        default=None, pattern=r"^([1-9][0-9]{0,4}x[1-9][0-9]{0,4}|auto)$", examples=["64x64"]
    )
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: ImageFormat = "png"

    @field_validator("response_format")
    @classmethod
    def _only_b64(cls, value: str) -> str:
        if value != "b64_json":
            raise PydanticCustomError(
                "unsupported_response_format",
                "response_format 'url' is not supported: this server keeps no images to link to; "
                "use 'b64_json'",
            )
        return value

    def to_native(self) -> GenerationRequest:
        """The same request in the native shape (``size`` split into width and height)."""
        width = height = None
        if self.size is not None and self.size != "auto":
            width, height = (int(side) for side in self.size.split("x"))
        # Every field here was validated by the definitions the two requests share; the size is
        # checked against the model, blaming ``size``, when the request is prepared.
        shared = {name: getattr(self, name) for name in _GenerationFields.model_fields}
        return GenerationRequest.model_construct(
            **shared, width=width, height=height, output_format=self.output_format
        )


# -- responses ---------------------------------------------------------------------------------------


class Timings(Response):
    """Milliseconds per stage; ``denoising_steps`` has one entry per denoising step.

    The stages add up to ``total``, from the request's receipt to its encoded media: ``queue_wait``
    (receipt to the worker's start), the pipeline's run (``text_encoding``, ``denoising``, ``decoding``
    and ``pipeline_overhead``), then ``encoding``. A stage the pipeline does not go through is absent,
    not 0.
    """

    queue_wait: float
    text_encoding: float | None = Field(default=None, description="absent when no text encoder ran")
    denoising: float | None = Field(default=None, description="the denoising steps, summed")
    denoising_steps: list[float]
    decoding: float | None = Field(default=None, description="VAE decoding; absent when nothing was decoded")
    pipeline_overhead: float = Field(
        default=0.0,
        description="the rest of the pipeline's run: its own preparation (scheduler, latents) and "
        "post-processing (to images or frames), and the worker's around the call",
    )
    encoding: float
    total: float

    @model_serializer(mode="wrap")
    def _without_absent_stages(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        fields: dict[str, Any] = handler(self)
        return {name: value for name, value in fields.items() if value is not None}

    def stages(self) -> dict[str, float]:
        """The stages present, in the order of a generation, ``total`` last."""
        return {
            name: value
            for name, value in (
                ("queue_wait", self.queue_wait),
                ("text_encoding", self.text_encoding),
                ("denoising", self.denoising),
                ("decoding", self.decoding),
                ("pipeline_overhead", self.pipeline_overhead),
                ("encoding", self.encoding),
                ("total", self.total),
            )
            if value is not None
        }


class CacheStats(Response):
    """What the cache did in this request's session."""

    method: str
    denoiser_calls: int
    steps_computed: int
    steps_cached: int
    blocks_computed: int
    blocks_reused: int
    attention_computed: int
    attention_reused: int
    peak_bytes: int = Field(
        description="the most memory this request's cache state held at once (residuals, attention "
        "outputs, Taylor factors), summed over the model's transformers"
    )
    estimated_error: float | None = Field(
        default=None,
        description="guarded_taylorseer's own estimate of its drift from the uncached output: the sum of "
        "the relative errors of the steps it predicted (null for the other methods)",
    )


class MediaItem(Response):
    b64_json: str


class TextCacheStats(Response):
    hits: int = Field(
        description="prompt encodings answered from the model's prompt cache, to the same bytes"
    )
    misses: int = Field(description="prompt encodings computed (and kept for the next request)")


class ReusedTrajectory(Response):
    request_id: str = Field(description="the earlier request whose kept latents this one started from")
    similarity: float = Field(description="the cosine similarity of the two prompts' text embeddings")
    steps_skipped: int = Field(description="the denoising steps not run: the earlier request's first ones")
    same_prompt: bool = Field(
        description="the earlier prompt was this one: the answer is what that request made (its noise)"
    )


class MergedForwards(Response):
    runs: int = Field(description="the transformer forwards (blocks) this request ran")
    merged: int = Field(description="of them, those that ran in one batch with other requests'")
    mean: float = Field(description="the mean number of requests in the forwards it ran in (1: alone)")
    largest: int = Field(description="the most requests in one of them")


class _ResultFields(Response):
    model: str
    # A default only for answers a job store kept from before tasks existed.
    task: Task | None = Field(
        default=None,
        description="what ran: text_to_image, text_to_video, image_to_image, inpainting, edit or image_to_video",
    )
    seed: int
    request_id: str
    timings: Timings
    cache: CacheStats | None = Field(description="null when the server runs without cache hooks")
    cache_policy: dict[str, Any] = Field(description="the policy applied, presets expanded")
    text_cache: TextCacheStats | None = Field(
        default=None, description="the prompt cache's part in this request; null when the server keeps none"
    )
    reused_from: str | None = Field(
        default=None,
        description='with "reuse": "exact", the request whose result this is, when an identical one came before',
    )
    reused_trajectory: ReusedTrajectory | None = Field(
        default=None,
        description='with "reuse": {"similar": ...}, the earlier request this one started from, when one was '
        "similar enough",
    )
    batch: MergedForwards | None = Field(
        default=None,
        description="how this request's transformer forwards were merged with other requests' (a server "
        "with max_batch above 1); null when its model copy runs one generation at a time",
    )


class GenerationResponse(_ResultFields):
    object: Literal["generation"] = "generation"
    created: int
    kind: Kind
    output_format: OutputFormat
    media_type: str
    width: int
    height: int
    num_frames: int | None
    fps: int | None
    steps: int
    guidance_scale: float
    strength: float | None = Field(
        default=None,
        description="with an image: how far from it the pipeline went, over strength x steps steps",
    )
    data: list[MediaItem]
    loras: list[LoraChoice] = Field(default_factory=list, description="the adapters applied, in order")


class ImagesResponse(_ResultFields):
    """The OpenAI Images response, plus our keys."""

    created: int
    data: list[MediaItem]
    output_format: ImageFormat
    size: str


class ImageEditRequest(ImageGenerationRequest):
    """``POST /v1/images/edits``: OpenAI's image edit, as the form fields of a multipart body (its images
    and mask come as files), plus our fields; ``cache`` is JSON text."""

    # Form fields are text: numbers come as "5", so this model converts where the JSON ones do not.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    strength: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="how far from the image to go, 1 repainting it whole (default 0.6)",
    )

    @field_validator("cache", "loras", mode="before")
    @classmethod
    def _cache_from_json_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise PydanticCustomError(
                    "form_json_invalid", "not JSON text: {error}", {"error": str(exc)}
                ) from exc
        return value

    def to_edit(self, images: list[str], mask: str | None) -> GenerationRequest:
        """The same request in the native shape, with its images and mask as base64 text."""
        native = self.to_native()
        return native.model_copy(
            update={
                "image": images[0] if len(images) == 1 else images,
                "mask": mask,
                "strength": self.strength,
            }
        )


# -- models ------------------------------------------------------------------------------------------


class ReplicaView(Response):
    id: str
    device: str
    queue_depth: int = Field(description="requests waiting for this replica")
    running: int = Field(description="1 while this replica generates, else 0")


class AdapterRequest(Request):
    """``POST /v1/admin/models/{model}/loras``: an adapter to load while serving."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][\w.-]*$")
    source: str = Field(min_length=1, max_length=1024, description="a file or folder under lora_dir")


class AdapterView(Response):
    name: str
    rank: int
    modules: int = Field(description="linear modules of the transformer it changes")
    bytes: int


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    kind: Kind
    family: str
    source: str
    cache_methods: list[str]
    output_formats: list[str]
    defaults: ModelDefaults
    limits: ModelLimits
    size_multiple: int = Field(description="width and height must be multiples of this")
    frame_step: int = Field(description="videos: num_frames - 1 must be a multiple of this")
    weight_bytes: int = Field(
        description="bytes of the transformers' weights as served (after any quantization)"
    )
    adapters: list[AdapterView] = Field(
        default_factory=list, description="LoRA adapters a request may name in loras"
    )
    tasks: list[Task] = Field(
        description="what the model does: text_to_image or text_to_video, then what it does with a "
        "request's image: image_to_image and inpainting (with a mask), edit (an edit model), image_to_video"
    )
    presets: dict[str, dict[str, Any]]
    method_defaults: dict[str, dict[str, Any]] = Field(
        description=(
            'per cache method, the policy `{"method": M}` with no other field runs on this model at its '
            "default steps: the reference defaults, fitted to the model where they cannot act on it; a "
            "listed method missing here needs a field the model cannot fill (MagCache's mag_ratios on a "
            "model never calibrated, TeaCache's coefficients on a family without published ones)"
        )
    )
    replicas: list[ReplicaView] = Field(description="copies of the model; a request goes to the least loaded")


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- jobs --------------------------------------------------------------------------------------------

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobProgress(Response):
    step: int
    total_steps: int


class ErrorDetail(Response):
    code: str
    message: str
    request_id: str | None
    param: str | None = None


class ErrorResponse(Response):
    """Every error answer: one envelope, whatever raised it."""

    error: ErrorDetail


class JobView(Response):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    request_id: str
    seed: int
    created: float
    started: float | None
    finished: float | None
    queue_position: int | None = Field(description="0: next to run; null unless queued")
    progress: JobProgress
    result: GenerationResponse | None
    error: ErrorDetail | None
