"""Results on the wire: the one place where what the runtime holds (finished generations, resident models,
stage timings, cache stats, jobs) becomes the protocol's response models, or the wire JSON a job
keeps in the store."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from cache_engine import SessionStats
from server.models import media
from server.models.registry import ResidentModel
from server.models.stages import StageTimings
from server.models.tasks import Task, text_task
from server.policy import engine_config as policy
from server.policy import resolve as named
from server.protocol import (
    AdapterView,
    CacheStats,
    ErrorDetail,
    GenerationResponse,
    ImagesResponse,
    JobProgress,
    JobView,
    LoraChoice,
    MediaItem,
    MergedForwards,
    ModelCard,
    ReplicaView,
    ReusedTrajectory,
    TextCacheStats,
    Timings,
)
from server.runtime.job_store import JobRecord
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
        tasks=list(model.task_names),
        adapters=[
            AdapterView(
                name=adapter.name, rank=adapter.rank, modules=len(adapter.modules), bytes=adapter.bytes
            )
            for adapter in (model.adapters or [])
        ],
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
        task=_task(finished),
        kind=prepared.kind,
        output_format=prepared.output_format,  # type: ignore[arg-type]
        media_type=prepared.media_type,
        width=params.width,
        height=params.height,
        num_frames=params.num_frames,
        fps=prepared.fps,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        strength=params.strength,
        loras=[LoraChoice(name=name, scale=scale) for name, scale in params.loras],
        seed=params.seed,
        request_id=prepared.request_id,
        data=_data(finished),
        timings=timings_view(finished.timings),
        cache=stats_view(finished.stats),
        cache_policy=_policy(finished),
        text_cache=_text_cache(finished),
        reused_from=finished.reused_from,
        reused_trajectory=_reused_trajectory(finished),
        batch=_batch(finished),
    )


def images_response(finished: Finished) -> ImagesResponse:
    prepared, params = finished.prepared, finished.prepared.params
    return ImagesResponse(
        created=prepared.created,
        data=_data(finished),
        output_format=prepared.output_format,  # type: ignore[arg-type]
        size=f"{params.width}x{params.height}",
        model=prepared.model.name,
        task=_task(finished),
        seed=params.seed,
        request_id=prepared.request_id,
        timings=timings_view(finished.timings),
        cache=stats_view(finished.stats),
        cache_policy=_policy(finished),
        text_cache=_text_cache(finished),
        reused_from=finished.reused_from,
        reused_trajectory=_reused_trajectory(finished),
        batch=_batch(finished),
    )


def _reused_trajectory(finished: Finished) -> ReusedTrajectory | None:
    resumed = finished.resumed
    if resumed is None:
        return None
    return ReusedTrajectory(
        request_id=resumed.request_id,
        similarity=resumed.similarity,
        steps_skipped=resumed.steps_skipped,
        same_prompt=resumed.same_prompt,
    )


def _batch(finished: Finished) -> MergedForwards | None:
    batch = finished.batch
    return None if batch is None else MergedForwards(**batch.as_dict())


def _text_cache(finished: Finished) -> TextCacheStats | None:
    tally = finished.text_cache
    return None if tally is None else TextCacheStats(hits=tally.hits, misses=tally.misses)


def _task(finished: Finished) -> Task:
    return finished.prepared.params.task or text_task(finished.prepared.kind)


def _policy(finished: Finished) -> dict[str, object]:
    described: dict[str, object] = policy.describe(finished.prepared.config)
    prepared = finished.prepared
    if prepared.target is not None:
        target = dict(prepared.target)
        estimate = finished.stats.estimated_error if finished.stats is not None else None
        if prepared.estimate is not None and estimate is not None:
            target.update(named.estimated_psnr(prepared.estimate, estimate))
        described["target"] = target
    return described


def result_json(finished: Finished) -> str:
    """A job's answer as the store keeps it: the native answer's JSON."""
    return generation_response(finished).model_dump_json()


def error_json(code: str, message: str, request_id: str | None, param: str | None = None) -> str:
    """A job's error as the store keeps it: the error envelope's inner object."""
    return ErrorDetail(code=code, message=message, request_id=request_id, param=param).model_dump_json()


def job_view(
    record: JobRecord, *, step: int, queue_position: int | None, with_result: bool = True
) -> JobView:
    """A job on the wire, from its stored record and its owner's live ``step`` and ``queue_position``."""
    result = None
    if with_result and record.result is not None:
        result = GenerationResponse.model_validate_json(record.result)
    return JobView(
        id=record.id,
        status=record.status,
        model=record.model,
        request_id=record.request_id,
        seed=record.seed,
        created=record.created,
        started=record.started,
        finished=record.finished,
        queue_position=queue_position,
        progress=JobProgress(step=step, total_steps=record.total_steps),
        result=result,
        error=None if record.error is None else ErrorDetail.model_validate_json(record.error),
    )
