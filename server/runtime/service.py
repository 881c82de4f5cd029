"""Generations: from a validated body to encoded media, through the model's worker.

``prepare`` checks what depends on the model (limits, formats, cache methods) and fixes every
default, so that what is queued is complete; ``submit`` queues it; ``finish`` waits for the worker
and encodes the media off the event loop. Routes and jobs share these three steps.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from PIL import Image

from cache_engine import CacheConfig, SessionStats, UnsupportedMethodError
from cache_engine.batching import BatchStats
from server.errors import (
    Conflict,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    ServerError,
    UnknownModel,
    UnsupportedCacheMethod,
)
from server.models import media, uploads
from server.models.adapters import Adapter, AdapterError
from server.models.calibration import EstimateFit
from server.models.generation import (
    GenerationParams,
    InvalidGenerationParams,
    check_params,
    trajectory_setting,
)
from server.models.limits import Kind
from server.models.prompt_cache import Tally
from server.models.registry import ResidentModel
from server.models.stages import StageTimings
from server.models.tasks import DEFAULT_STRENGTH, STRENGTH_TASKS, image_task
from server.models.tasks import Task as TaskName
from server.models.trajectories import Resumed, ResumeLimits, TrajectoryRun, resumable
from server.policy import engine_config as policy
from server.policy.resolve import Resolved, resolve
from server.protocol import GenerationRequest
from server.runtime.metrics import Metrics
from server.runtime.replicas import Replica, least_loaded
from server.runtime.results import ResultCache, Stored, result_key
from server.runtime.worker import Outcome, Task, Worker

T = TypeVar("T")

# Seeds drawn for requests without one stay below 2**32 so that any client can store them.
_SEED_BOUND = 2**32
# For a video model whose defaults do not say: the rate most video models are trained at.
_FALLBACK_FPS = 16
# Room for an upload's headers and metadata over its pixels.
_UPLOAD_SLACK_BYTES = 64 * 1024
# How often a waiting request checks whether its client has gone.
_DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Prepared:
    """A request with every default filled in, checked against its model."""

    request_id: str
    model: ResidentModel
    params: GenerationParams
    config: CacheConfig | None
    output_format: str
    fps: int | None
    received_at: float
    created: int
    # time.monotonic() past which the generation stops and answers 504; None: no deadline.
    deadline: float | None = None
    # For a policy chosen from a PSNR floor: the floor, what was measured, on which setting.
    target: Mapping[str, Any] | None = None
    # For a guarded policy chosen from a floor: how the request's own error estimate maps to PSNR.
    estimate: EstimateFit | None = None
    # With "reuse": "exact" and a seed: what an identical request's result is kept under (results.py).
    reuse_key: str | None = None
    # With "reuse": {"similar": ...}: how far it may start along a similar earlier prompt's trajectory.
    similar: ResumeLimits | None = None
    # Who sent it (the name of its API key; "" on a server with one key or none): nothing one tenant's
    # requests keep across requests is seen by another's.
    tenant: str = ""

    @property
    def kind(self) -> Kind:
        return self.model.kind

    @property
    def media_type(self) -> str:
        return media.media_type(self.model.kind, self.output_format)


@dataclass(frozen=True)
class Finished:
    prepared: Prepared
    media: list[bytes]
    timings: StageTimings
    # What the cache did: summed over the model's transformers; None without cache hooks.
    stats: SessionStats | None
    # Prompt encodings answered from the model's prompt cache, and computed; None: it keeps none.
    text_cache: Tally | None = None
    # The request whose kept result answered this one; None: computed for it.
    reused_from: str | None = None
    # The earlier request whose trajectory it started from; None: it started from noise.
    resumed: Resumed | None = None
    # How its transformer forwards merged with others'; None: its model copy runs one at a time.
    batch: BatchStats | None = None


class Generations:
    """The resident models, their workers, and the three steps of a generation."""

    def __init__(
        self,
        replicas: Mapping[str, Sequence[Replica]],
        *,
        metrics: Metrics,
        results: ResultCache | None = None,
        max_loras_per_request: int = 4,
    ) -> None:
        self.replicas = {name: tuple(copies) for name, copies in replicas.items() if copies}
        # The first replica of each model answers for it (its limits, defaults and presets): every
        # replica of a model is loaded from the same spec and settings.
        self.models = {name: copies[0].model for name, copies in self.replicas.items()}
        self.metrics = metrics
        # Whole results, for requests that allow their reuse; None: none are kept.
        self.results = results
        # The adapters one request may name.
        self.max_loras_per_request = max_loras_per_request

    @property
    def workers(self) -> dict[str, Worker]:
        """Each model's first replica's worker."""
        return {name: copies[0].worker for name, copies in self.replicas.items()}

    def all_workers(self) -> list[Worker]:
        return [replica.worker for copies in self.replicas.values() for replica in copies]

    @property
    def ready(self) -> bool:
        workers = self.all_workers()
        return bool(workers) and all(worker.alive for worker in workers)

    # -- adapters while serving ------------------------------------------------------------------

    def add_adapter(self, model_name: str, name: str, source: Path, *, max_loras: int) -> Adapter:
        """Load adapter ``name`` from ``source`` into every replica of ``model_name``. Blocking."""
        model = self.resolve_model(model_name, None)
        if model.adapters is None:
            raise InvalidRequest(
                f"{model.name} ({type(model.pipeline).__name__}) takes no adapters", param="model"
            )
        if name in model.adapters:
            raise Conflict(f"{model.name} has an adapter named {name!r} already", param="name")
        if len(model.adapters) >= max_loras:
            raise Conflict(
                f"{model.name} holds {max_loras} adapters, the most it may (max_loras)", param="name"
            )
        loaded = []
        try:
            for replica in self.replicas[model.name]:
                adapters = replica.model.adapters
                assert adapters is not None
                loaded.append(adapters.load(name, str(source)))
        except AdapterError as exc:
            for replica in self.replicas[model.name][: len(loaded)]:
                assert replica.model.adapters is not None
                replica.model.adapters.remove(name)
            raise InvalidRequest(str(exc), param="source") from exc
        return loaded[0]

    def remove_adapter(self, model_name: str, name: str) -> None:
        """Drop adapter ``name`` from every replica, once the requests running with it are done. Blocking."""
        model = self.resolve_model(model_name, None)
        if model.adapters is None or name not in model.adapters:
            raise NotFound(f"{model.name} has no adapter {name!r}", param="name")
        for replica in self.replicas[model.name]:
            assert replica.model.adapters is not None
            replica.model.adapters.remove(name)

    def supported_methods(self, model: ResidentModel) -> tuple[str, ...]:
        return ("none", *model.supported_methods)

    def resolve_model(self, name: str | None, kind: Kind | None = None) -> ResidentModel:
        if name is None:
            for model in self.models.values():
                if kind is None or model.kind == kind:
                    return model
            raise InvalidRequest(f"no {kind} model is resident; name one in 'model'", param="model")
        if name not in self.models:
            raise UnknownModel(name, tuple(self.models))
        model = self.models[name]
        if kind is not None and model.kind != kind:
            raise InvalidRequest(
                f"model {name!r} makes {model.kind}s; this endpoint needs a {kind} model", param="model"
            )
        return model

    # -- step 1 -----------------------------------------------------------------------------------

    def prepare(
        self,
        body: GenerationRequest,
        request_id: str,
        *,
        kind: Kind | None = None,
        size_param: str | None = None,
        timeout_s: float | None = None,
        model: ResidentModel | None = None,
        tenant: str = "",
    ) -> Prepared:
        """Check ``body`` against its model and fill in the defaults; raises InvalidRequest.

        ``size_param`` names the field to blame for a bad width or height (``size`` in the OpenAI
        request, which has no width and height of its own). ``timeout_s`` starts the deadline now.
        ``model`` is the body's model when the caller has resolved it already; ``tenant`` the name of
        the API key it came with.
        """
        received_at = time.perf_counter()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if model is None:
            model = self.resolve_model(body.model, kind)
        defaults = model.defaults
        video = model.kind == "video"
        if not video:
            for field in ("num_frames", "fps"):
                if getattr(body, field) is not None:
                    raise InvalidRequest(f"{field} applies to video models only", param=field)
        if body.guidance_scale is not None and model.call_spec.guidance_argument is None:
            raise InvalidRequest(
                f"model {model.name!r} ({type(model.pipeline).__name__}) takes no guidance scale",
                param="guidance_scale",
            )
        fps = _or(body.fps, defaults.fps or _FALLBACK_FPS) if video else None
        if len(body.loras) > self.max_loras_per_request:
            raise InvalidRequest(
                f"a request may name {self.max_loras_per_request} adapters at most, got {len(body.loras)}",
                param="loras",
            )
        decoded, mask = _uploads(body, model)
        image = decoded[0] if decoded else None
        task = None if image is None else image_task(model.tasks, masked=mask is not None, kind=model.kind)
        # An image sets the size when the body does not: its own, down to the multiple the model needs.
        width = _or(body.width, defaults.width if image is None else _snapped(image.width, model, "image"))
        height = _or(
            body.height, defaults.height if image is None else _snapped(image.height, model, "image")
        )
        params = GenerationParams(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            width=width,
            height=height,
            num_frames=_or(body.num_frames, defaults.num_frames) if video else None,
            steps=_or(body.steps, defaults.steps),
            guidance_scale=_or(body.guidance_scale, defaults.guidance_scale),
            seed=_or(body.seed, secrets.randbelow(_SEED_BOUND)),
            n=body.n,
            fps=fps,
            image=None if image is None else image.convert("RGB"),
            more_images=tuple(extra.convert("RGB") for extra in decoded[1:]),
            mask=mask,
            strength=body.strength
            if task not in STRENGTH_TASKS or body.strength is not None
            else _default_strength(model, task),
            task=task,
            loras=tuple((choice.name, choice.scale) for choice in body.loras),
        )
        try:
            check_params(model, params)
        except InvalidGenerationParams as exc:
            param = exc.param
            if param in ("width", "height"):
                given = body.width if param == "width" else body.height
                param = size_param or ("image" if given is None and image is not None else param)
            raise InvalidRequest(str(exc), param=param) from exc

        output_format = body.output_format or media.DEFAULT_FORMAT[model.kind]
        formats = media.MEDIA_TYPES[model.kind]
        if output_format not in formats:
            raise InvalidRequest(
                f"{model.kind} models write {', '.join(formats)}, not {output_format!r}",
                param="output_format",
            )
        if output_format == "mp4" and not media.mp4_size_ok(params.width, params.height):
            raise InvalidRequest("mp4 needs an even width and height", param=size_param or "width")

        resolved = self._cache_config(body, model, params)
        config = resolved.config
        reuse_key = None
        if body.reuse == "exact" and body.seed is not None and self.results is not None:
            reuse_key = result_key(tenant, model.name, params, config, output_format, fps)
        similar = None
        if not isinstance(body.reuse, str):
            _check_similar(model, params)
            knobs = body.reuse.similar
            similar = ResumeLimits(knobs.min_similarity, knobs.max_skipped_steps)
        return Prepared(
            request_id=request_id,
            model=model,
            params=params,
            config=config,
            output_format=output_format,
            fps=fps,
            received_at=received_at,
            created=int(time.time()),
            deadline=deadline,
            target=resolved.promise,
            estimate=resolved.estimate,
            reuse_key=reuse_key,
            similar=similar,
            tenant=tenant,
        )

    def _cache_config(
        self, body: GenerationRequest, model: ResidentModel, params: GenerationParams
    ) -> Resolved:
        # Image-to-image runs strength x steps steps: the run fields and a target count those.
        resolved = resolve(model, body.cache, params.steps_run, params.guidance_scale, params.loras)
        config = resolved.config
        if config is None:
            return resolved
        method = policy.method_of(config)
        supported = self.supported_methods(model)
        param = resolved.param
        if method not in supported:
            why = "" if model.cache.installed else " (the server runs without cache hooks)"
            raise UnsupportedCacheMethod(
                f"model {model.name!r} does not support cache method {method!r}{why}; "
                f"supported: {', '.join(supported)}",
                param=param,
            )
        try:
            model.cache.check(config)
        except UnsupportedMethodError as exc:
            raise UnsupportedCacheMethod(str(exc), param=param) from exc
        except ValueError as exc:
            raise InvalidRequest(str(exc), param=policy.param_of(exc)) from exc
        return resolved

    # -- step 2 -----------------------------------------------------------------------------------

    def submit(
        self,
        prepared: Prepared,
        *,
        on_start: Callable[[], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        poll_cancel: Callable[[], bool] | None = None,
    ) -> Task:
        """Queue ``prepared`` on its model's least loaded replica; raises QueueFull. Callbacks run on the
        worker; ``poll_cancel`` is asked at each step whether to stop (see ``Task``)."""
        worker = least_loaded(self.replicas.get(prepared.model.name, ())).worker
        task = Task(
            request_id=prepared.request_id,
            params=prepared.params,
            config=prepared.config,
            on_start=on_start,
            on_step=on_step,
            deadline=prepared.deadline,
            poll_cancel=poll_cancel,
            enqueued_at=prepared.received_at,
            trajectory=_trajectory_run(prepared, worker.model),
            tenant=prepared.tenant,
        )
        worker.submit(task)
        return task

    def position(self, prepared: Prepared, task: Task) -> int | None:
        """The task's place in its replica's queue."""
        return None if task.worker is None else task.worker.position(task)

    def cancel(self, prepared: Prepared, task: Task, reason: ServerError | None = None) -> bool:
        """True if ``task`` was still queued and is now dropped; False if it will stop at a step."""
        assert task.worker is not None, "a task is cancelled only after it was submitted"
        return task.worker.cancel(task, reason)

    def cancel_all(self, reason: ServerError) -> None:
        for worker in self.all_workers():
            worker.cancel_all(reason)

    def idle(self) -> bool:
        """No worker runs or holds a task."""
        return all(worker.idle() for worker in self.all_workers())

    # -- step 3 -----------------------------------------------------------------------------------

    async def finish(self, prepared: Prepared, task: Task) -> Finished:
        """Wait for ``task`` and encode its media; raises what the worker raised."""
        method = policy.method_of(prepared.config)
        try:
            outcome = await asyncio.wrap_future(task.future)
            encoded = await anyio.to_thread.run_sync(_encode_all, prepared, outcome)
        except Exception as exc:
            self.metrics.generation_done(prepared.model.name, method, type(exc).__name__, None, None)
            raise
        done = time.perf_counter()
        result = outcome.result
        # Encoding counts from the worker's result: handing it to the event loop and to the encoding
        # thread is part of getting the media out.
        timings = StageTimings.of_run(
            queue_wait=outcome.queue_wait_ms,
            run=outcome.run_ms,
            stages=result.timings_ms,
            denoising_steps=list(result.step_times_ms),
            encoding=(done - outcome.finished_at) * 1000,
            total=(done - prepared.received_at) * 1000,
        )
        self.metrics.generation_done(prepared.model.name, method, "ok", timings, outcome.stats)
        if result.text_cache is not None:
            self.metrics.prompt_encodings(
                prepared.model.name, result.text_cache.hits, result.text_cache.misses
            )
        if prepared.reuse_key is not None and self.results is not None:
            self.results.put(prepared.reuse_key, Stored(tuple(encoded), outcome.stats, prepared.request_id))
        if result.resumed is not None:
            self.metrics.steps_skipped(prepared.model.name, result.resumed.steps_skipped)
        return Finished(
            prepared=prepared,
            media=encoded,
            timings=timings,
            stats=outcome.stats,
            text_cache=result.text_cache,
            resumed=result.resumed,
            batch=outcome.batch,
        )

    def reused(self, prepared: Prepared) -> Finished | None:
        """The kept result of an identical earlier request, when ``prepared`` allows its reuse."""
        if prepared.reuse_key is None or self.results is None:
            return None
        stored = self.results.get(prepared.reuse_key)
        if stored is None:
            return None
        elapsed = (time.perf_counter() - prepared.received_at) * 1000
        # No pipeline ran: what the answer took is the kept media handed out.
        timings = StageTimings(
            queue_wait=0.0, pipeline={}, denoising_steps=[], encoding=elapsed, total=elapsed
        )
        self.metrics.generation_done(
            prepared.model.name, policy.method_of(prepared.config), "reused", timings, None
        )
        return Finished(
            prepared=prepared,
            media=list(stored.media),
            timings=timings,
            stats=stored.stats,
            reused_from=stored.request_id,
        )

    async def run(self, prepared: Prepared, is_disconnected: Callable[[], Awaitable[bool]]) -> Finished:
        """All three steps for a client that waits; cancels the generation if the client goes away.

        A task still queued when its deadline passes is dropped here; a running one is stopped by
        its worker at the next step. Either way the answer is DeadlineExceeded.
        """
        kept = self.reused(prepared)
        if kept is not None:
            return kept
        task = self.submit(prepared)
        finishing = asyncio.ensure_future(self.finish(prepared, task))
        try:
            while True:
                done, _ = await asyncio.wait({finishing}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return finishing.result()
                if task.expired():
                    self.cancel(prepared, task, DeadlineExceeded("the request's timeout passed while queued"))
                    return await finishing
                if await is_disconnected():
                    self.cancel(prepared, task)
                    # The worker stops within a step; what finishing raises then is the answer.
                    return await finishing
        except asyncio.CancelledError:
            self.cancel(prepared, task)
            raise

    def start(self) -> None:
        for worker in self.all_workers():
            worker.start()

    def stop(self, timeout: float | None = None) -> None:
        for worker in self.all_workers():
            worker.stop(timeout)


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _uploads(body: GenerationRequest, model: ResidentModel) -> tuple[list[Image.Image], Image.Image | None]:
    """The body's images and mask (as the pipelines take it), decoded within the model's bounds."""
    if body.image is None:
        if body.mask is not None:
            raise InvalidRequest("mask needs an image to paint on", param="mask")
        return [], None
    images = [body.image] if isinstance(body.image, str) else body.image
    edit = model.tasks.get("edit")
    most = edit.max_images if edit is not None and body.mask is None else 1
    if not 1 <= len(images) <= most:
        taken = "one image" if most == 1 else f"1 to {most} images"
        raise InvalidRequest(f"{model.name} takes {taken}, got {len(images)}", param="image")
    pixels = model.limits.max_pixels
    # A compressed image larger than its raw pixels twice over is no image this model could take.
    max_bytes = pixels * 4 * 2 + _UPLOAD_SLACK_BYTES
    try:
        decoded = [
            uploads.decode_image(
                text,
                param="image" if len(images) == 1 else f"image.{index}",
                max_bytes=max_bytes,
                max_pixels=pixels,
            )
            for index, text in enumerate(images)
        ]
        mask = None
        if body.mask is not None:
            alpha = uploads.decode_image(body.mask, param="mask", max_bytes=max_bytes, max_pixels=pixels)
            mask = uploads.mask_from_alpha(alpha, decoded[0].size)
    except uploads.InvalidUpload as exc:
        raise InvalidRequest(str(exc), param=exc.param) from exc
    return decoded, mask


def _default_strength(model: ResidentModel, task: TaskName | None) -> float:
    """The strength a request that gives none runs ``task`` at: its pipeline's own default (a task the
    model lacks is refused after this, naming the field)."""
    pipeline = model.tasks.get(task) if task is not None else None
    return DEFAULT_STRENGTH if pipeline is None else pipeline.default_strength


def _snapped(side: int, model: ResidentModel, param: str) -> int:
    snapped = side - side % model.size_multiple
    if snapped < model.size_multiple:
        raise InvalidRequest(
            f"{param} is {side} pixels across, under the {model.size_multiple} this model needs", param=param
        )
    return snapped


def _encode_all(prepared: Prepared, outcome: Outcome) -> list[bytes]:
    result = outcome.result
    items: Sequence[Image.Image | list[Image.Image]] = (
        result.images if prepared.kind == "image" else result.videos
    ) or []
    sounds: Sequence[media.Soundtrack | None] = result.sounds or [None] * len(items)
    return [
        media.encode(prepared.kind, prepared.output_format, item, prepared.fps, sound)
        for item, sound in zip(items, sounds, strict=True)
    ]


def _check_similar(model: ResidentModel, params: GenerationParams) -> None:
    """Refuse, naming ``reuse``, a request that asks to start along a trajectory where none can be."""
    if model.trajectories is None:
        why = (
            "the server keeps none (trajectory_cache_mb is 0)"
            if resumable(model.pipeline, model.call_spec.steps_observed_by)
            else f"its pipeline ({type(model.pipeline).__name__}) cannot start from kept latents"
        )
        raise InvalidRequest(f"model {model.name!r} keeps no trajectories: {why}", param="reuse")
    if params.task is not None:
        raise InvalidRequest(
            f'"reuse": {{"similar": ...}} starts text-to-{model.kind} requests only, not {params.task}',
            param="reuse",
        )


def _trajectory_run(prepared: Prepared, model: ResidentModel) -> TrajectoryRun | None:
    """The request's part in its replica's kept trajectories: a fresh one for each run, since a run
    that stopped kept nothing."""
    similar = prepared.similar
    if similar is None or model.trajectories is None:
        return None
    params = prepared.params
    return TrajectoryRun(
        model.trajectories,
        trajectory_setting(prepared.tenant, params),
        prepared.request_id,
        params.prompt,
        params.steps,
        resume=True,
        min_similarity=similar.min_similarity,
        max_skipped_steps=similar.max_skipped_steps,
    )
