"""Asynchronous jobs: a generation queued now, watched and fetched later.

A job's state changes only on the event loop: the worker thread posts its start and its steps with
``call_soon_threadsafe``, and an asyncio task awaits the result. Watchers (server-sent events) wait
on an ``asyncio.Event`` each. Finished jobs are kept for ``ttl_s`` seconds, at most ``max_finished``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .errors import Conflict, GenerationCancelled, NotFound, ServerError
from .protocol import ErrorDetail, GenerationRequest, GenerationResponse, JobProgress, JobStatus, JobView
from .responses import generation_response
from .service import Generations, Prepared
from .worker import Task

logger = logging.getLogger(__name__)

FINAL: frozenset[JobStatus] = frozenset({"succeeded", "failed", "cancelled"})
# Comment lines keep proxies from closing a stream that has been quiet this long.
_KEEPALIVE_S = 15.0
_QUEUED_POLL_S = 0.5


@dataclass(eq=False)
class Job:
    id: str
    prepared: Prepared
    created: float = field(default_factory=time.time)
    status: JobStatus = "queued"
    started: float | None = None
    finished: float | None = None
    result: GenerationResponse | None = None
    error: ErrorDetail | None = None
    task: Task | None = None
    runner: asyncio.Task[None] | None = None
    watchers: set[asyncio.Event] = field(default_factory=set)

    @property
    def step(self) -> int:
        # Read from the worker's own count, so that a view taken right after a cancel is exact.
        return 0 if self.task is None else self.task.steps_done

    def changed(self) -> None:
        for watcher in self.watchers:
            watcher.set()


class Jobs:
    def __init__(self, generations: Generations, *, ttl_s: float, max_finished: int) -> None:
        self.generations = generations
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self._jobs: dict[str, Job] = {}

    def create(self, body: GenerationRequest, request_id: str, *, timeout_s: float | None = None) -> Job:
        """Queue ``body``; raises InvalidRequest or QueueFull without leaving a job behind."""
        self._evict()
        prepared = self.generations.prepare(body, request_id, timeout_s=timeout_s)
        job = Job(id=f"job_{uuid.uuid4().hex}", prepared=prepared)
        loop = asyncio.get_running_loop()

        def on_start() -> None:
            loop.call_soon_threadsafe(self._started, job)

        def on_step(step: int, total: int) -> None:
            loop.call_soon_threadsafe(job.changed)

        job.task = self.generations.submit(prepared, on_start=on_start, on_step=on_step)
        self._jobs[job.id] = job
        job.runner = asyncio.create_task(self._run(job), name=job.id)
        return job

    def get(self, job_id: str) -> Job:
        self._evict()
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept {self.ttl_s:g} s)", param="id")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status in FINAL:
            raise Conflict(f"job {job_id!r} has already {job.status}", param="id")
        assert job.task is not None
        if self.generations.cancel(job.prepared, job.task):
            # Dropped from the queue: final now, so that the reply to DELETE already says so.
            job.status = "cancelled"
            job.error = ErrorDetail(
                code="cancelled", message="cancelled before it started", request_id=job.prepared.request_id
            )
            job.finished = time.time()
            job.changed()
            self._queue_moved()
        return job

    def view(self, job: Job, *, with_result: bool = True) -> JobView:
        position = None
        if job.status == "queued" and job.task is not None:
            position = self.generations.position(job.prepared, job.task)
        return JobView(
            id=job.id,
            status=job.status,
            model=job.prepared.model.name,
            request_id=job.prepared.request_id,
            seed=job.prepared.params.seed,
            created=job.created,
            started=job.started,
            finished=job.finished,
            queue_position=position,
            progress=JobProgress(step=job.step, total_steps=job.prepared.params.steps),
            result=job.result if with_result else None,
            error=job.error,
        )

    async def events(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events: ``queued`` (again whenever the position changes), ``running``,
        ``progress`` per step, then the final status.

        Each carries the job as JSON; only the final one carries the result.
        """
        watcher = asyncio.Event()
        job.watchers.add(watcher)
        sent: tuple[str, int | None, int] | None = None
        last_sent = time.monotonic()
        try:
            while True:
                watcher.clear()
                if job.status in FINAL:
                    yield _event(job.status, self.view(job))
                    return
                view = self.view(job, with_result=False)
                state = (view.status, view.queue_position, view.progress.step)
                if state != sent:
                    name = (
                        "progress" if sent is not None and state[0] == sent[0] == "running" else view.status
                    )
                    sent, last_sent = state, time.monotonic()
                    yield _event(name, view)
                elif time.monotonic() - last_sent >= _KEEPALIVE_S:
                    last_sent = time.monotonic()
                    yield ": keep-alive\n\n"
                # A queued job's position also moves when requests that are not jobs leave the
                # queue, which wakes no watcher: look again now and then.
                timeout = _QUEUED_POLL_S if job.status == "queued" else _KEEPALIVE_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wait(), timeout)
        finally:
            job.watchers.discard(watcher)

    async def close(self) -> None:
        runners = [job.runner for job in self._jobs.values() if job.runner is not None]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)

    # -- on the event loop ------------------------------------------------------------------------

    def _started(self, job: Job) -> None:
        if job.status == "queued":
            job.status = "running"
            job.started = time.time()
            job.changed()
            self._queue_moved()

    def _queue_moved(self) -> None:
        """Wake the watchers of every queued job: their positions may have changed."""
        for other in self._jobs.values():
            if other.status == "queued":
                other.changed()

    async def _run(self, job: Job) -> None:
        assert job.task is not None
        try:
            finished = await self.generations.finish(job.prepared, job.task)
            job.result = generation_response(finished)
            job.status = "succeeded"
        except GenerationCancelled as exc:
            if job.status != "cancelled":
                job.status = "cancelled"
                job.error = _detail(exc, job)
        except ServerError as exc:
            job.status = "failed"
            job.error = _detail(exc, job)
        except asyncio.CancelledError:
            job.status = "cancelled"
            job.error = ErrorDetail(code="cancelled", message="the server is shutting down", request_id=None)
            self.generations.cancel(job.prepared, job.task)
            raise
        except Exception:
            logger.exception("job %s failed", job.id)
            job.status = "failed"
            job.error = ErrorDetail(
                code="internal_error", message="internal error", request_id=job.prepared.request_id
            )
        finally:
            job.finished = job.finished or time.time()
            job.changed()

    def _evict(self) -> None:
        now = time.time()
        finished = [job for job in self._jobs.values() if job.finished is not None]
        finished.sort(key=lambda job: job.finished or 0.0)
        excess = len(finished) - self.max_finished
        for index, job in enumerate(finished):
            if index < excess or now - (job.finished or now) > self.ttl_s:
                del self._jobs[job.id]


def _detail(exc: ServerError, job: Job) -> ErrorDetail:
    return ErrorDetail(
        code=exc.code, message=exc.message, request_id=job.prepared.request_id, param=exc.param
    )


def _event(name: str, view: JobView) -> str:
    return f"event: {name}\ndata: {json.dumps(view.model_dump(mode='json'), separators=(',', ':'))}\n\n"
