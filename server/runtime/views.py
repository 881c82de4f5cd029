"""Results on the wire: the one place where what the runtime holds (finished generations, resident models,
stage timings, cache stats) becomes the protocol's response models."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from cache_engine import SessionStats
from server.models import media
from server.models.registry import ResidentModel
from server.models.stages import StageTimings
from server.policy import engine_config as policy
from server.policy import resolve as named
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


def timings_view(timings: StageTimings) -> Timings:
    return Timings(**timings.stages(), denoising_steps=timings.denoising_steps)


def stats_view(stats: SessionStats | None) -> CacheStats | None:
    if stats is None:
        return None
    values = stats.as_dict()
    return CacheStats(**{**values, "method": values["method"] or "none"})


def model_card(model: ResidentModel, methods: tuple[str, ...], replicas: Sequence[Replica]) -> ModelCard:
    """``model`` on the wire; ``methods`` are the cache methods a request may name for it."""
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
        presets=named.presets(model, methods),
        method_defaults=named.method_defaults(model, methods),
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
