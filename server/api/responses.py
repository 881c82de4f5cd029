"""A finished generation as JSON (native or OpenAI shape) or as raw media, and the choice between them."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence

from fastapi.responses import Response

from cache_engine import SessionStats
from server.errors import NotAcceptable
from server.models import media
from server.models.limits import Kind
from server.models.registry import ResidentModel
from server.models.stages import StageTimings
from server.policy import engine_config as policy
from server.policy.named import calibrated_presets
from server.protocol import (
    CacheStats,
    GenerationResponse,
    ImagesResponse,
    MediaItem,
    ModelCard,
    ReplicaView,
    Timings,
)
from server.runtime.replicas import Replica
from server.runtime.service import Finished

_JSON_RANGES = frozenset({"*/*", "application/*", "application/json"})
_EXTENSIONS = {"jpeg": "jpg"}


def server_timing(timings: StageTimings) -> str:
    return ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in timings.stages().items())


def timings_view(timings: StageTimings) -> Timings:
    return Timings(**timings.stages(), denoising_steps=timings.denoising_steps)


def stats_view(stats: SessionStats | None) -> CacheStats | None:
    if stats is None:
        return None
    values = stats.as_dict()
    return CacheStats(**{**values, "method": values["method"] or "none"})


def model_card(model: ResidentModel, methods: tuple[str, ...], replicas: Sequence[Replica]) -> ModelCard:
    """``model`` on the wire; ``methods`` are the cache methods a request may name for it."""
    presets = calibrated_presets(model)
    if presets is None:
        presets = {
            name: policy.describe(config)
            for name, config in model.presets.items()
            if policy.method_of(config) in methods
        }
    return ModelCard(
        id=model.name,
        kind=model.kind,
        family=model.family,
        source=model.source,
        cache_methods=list(methods),
        output_formats=list(media.MEDIA_TYPES[model.kind]),
        defaults=model.defaults,
        limits=model.limits,
        size_multiple=model.size_multiple,
        frame_step=model.frame_step,
        weight_bytes=model.weight_bytes,
        presets=presets,
        replicas=[
            ReplicaView(
                id=replica.id,
                device=replica.device,
                queue_depth=replica.worker.queue_depth,
                running=replica.worker.busy,
            )
            for replica in replicas
        ],
    )


def result_headers(finished: Finished) -> dict[str, str]:
    """What a JSON body already says, for clients that read only headers (raw media)."""
    headers = {
        "Server-Timing": server_timing(finished.timings),
        "X-Seed": str(finished.prepared.params.seed),
        "X-Denoising-Steps-Ms": ",".join(f"{ms:.1f}" for ms in finished.timings.denoising_steps),
    }
    stats = stats_view(finished.stats)
    if stats is not None:
        headers["X-Cache-Stats"] = json.dumps(stats.model_dump(), separators=(",", ":"))
    return headers


def negotiate(accept: str | None, kind: Kind, requested: str | None) -> str | None:
    """The format the client wants as raw bytes, or None for the JSON envelope.

    Media ranges are tried by quality, then in the order written; ``*/*`` and JSON mean the
    envelope. ``requested`` is the body's ``output_format``, which a raw type has to agree with.
    """
    if not accept or not accept.strip():
        return None
    formats = media.MEDIA_TYPES[kind]
    preferred = [requested] if requested else [media.DEFAULT_FORMAT[kind], *formats]
    for media_range in _media_ranges(accept):
        if media_range in _JSON_RANGES:
            return None
        for fmt in preferred:
            if fmt in formats and _matches(media_range, formats[fmt]):
                return fmt
    offered = ", ".join(dict.fromkeys(formats[fmt] for fmt in preferred if fmt in formats))
    raise NotAcceptable(f"Accept {accept!r} matches none of: application/json, {offered}")


def raw_response(finished: Finished) -> Response:
    prepared = finished.prepared
    extension = _EXTENSIONS.get(prepared.output_format, prepared.output_format)
    headers = result_headers(finished)
    headers["Content-Disposition"] = f'inline; filename="{prepared.request_id}.{extension}"'
    return Response(finished.media[0], media_type=prepared.media_type, headers=headers)


def _data(finished: Finished) -> list[MediaItem]:
    return [MediaItem(b64_json=base64.b64encode(item).decode("ascii")) for item in finished.media]


def generation_response(finished: Finished) -> GenerationResponse:
    prepared, params = finished.prepared, finished.prepared.params
    return GenerationResponse(
        created=prepared.created,
        model=prepared.model.name,
        kind=prepared.kind,
        output_format=prepared.output_format,  # type: ignore[arg-type]
        media_type=prepared.media_type,
        width=params.width,
        height=params.height,
        num_frames=params.num_frames,
        fps=prepared.fps,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
        request_id=prepared.request_id,
        data=_data(finished),
        timings=timings_view(finished.timings),
        cache=stats_view(finished.stats),
        cache_policy=_policy(finished),
    )


def images_response(finished: Finished) -> ImagesResponse:
    prepared, params = finished.prepared, finished.prepared.params
    return ImagesResponse(
        created=prepared.created,
        data=_data(finished),
        output_format=prepared.output_format,  # type: ignore[arg-type]
        size=f"{params.width}x{params.height}",
        model=prepared.model.name,
        seed=params.seed,
        request_id=prepared.request_id,
        timings=timings_view(finished.timings),
        cache=stats_view(finished.stats),
        cache_policy=_policy(finished),
    )


def _policy(finished: Finished) -> dict[str, object]:
    described: dict[str, object] = policy.describe(finished.prepared.config)
    if finished.prepared.target is not None:
        described["target"] = dict(finished.prepared.target)
    return described


def _media_ranges(accept: str) -> list[str]:
    ranked: list[tuple[float, int, str]] = []
    for order, part in enumerate(accept.split(",")):
        pieces = [piece.strip() for piece in part.split(";")]
        media_range = pieces[0].lower()
        quality = 1.0
        for parameter in pieces[1:]:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media_range and quality > 0:
            ranked.append((-quality, order, media_range))
    return [media_range for _, _, media_range in sorted(ranked)]


def _matches(media_range: str, media_type: str) -> bool:
    major, _, minor = media_range.partition("/")
    type_major, _, type_minor = media_type.partition("/")
    return major == type_major and minor in ("*", type_minor)
