"""Asynchronous jobs: a generation queued now, watched, fetched or cancelled later, from any process.

Every job is a record in the job store (``server.runtime.job_store``), which outlives the process and which
every replica and ingress reaches. The process that accepted a job runs it (it *owns* it) and writes
its changes there: started, progress, queue position, and at the end the result as wire JSON or the
error. Any other process answers for it from the store: a view, server-sent events (by polling), a
cancel (a queued job is ended in the store at once; a running one gets a flag that its owner's
worker reads at the end of every step).

While this process runs a job, its state also lives here, changed only on the event loop: the worker
thread posts its start and steps with ``call_soon_threadsafe``, an asyncio task awaits the result,
and watchers (server-sent events) wait on an ``asyncio.Event`` each. The owner's view is exact (the
worker's own step count, the live queue position).

Owners beat a heartbeat in the store. A job whose owner has gone silent for ``owner_timeout_s`` (the
process died, the replica was killed, the server restarted) is claimed by a live process and run
again from its stored body and seed, which gives the same bytes; or, when it cannot be (its model is
gone, its deadline passed, it has taken ``MAX_RUNS`` servers down with it), it ends ``failed`` with
the reason. Finished jobs are kept ``ttl_s`` seconds, at most ``max_finished`` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from server.errors import Conflict, GenerationCancelled, NotFound, QueueFull, ServerError, Unavailable
from server.protocol import GenerationRequest, JobView
from server.runtime import views
from server.runtime.job_store import FINAL, JobRecord, JobStore
from server.runtime.service import Generations, Prepared
from server.runtime.worker import Task

logger = logging.getLogger(__name__)

__all__ = ["FINAL", "MAX_RUNS", "Job", "Jobs"]

# A job that was running each time its server died this many times is not run again.
MAX_RUNS = 3
# Comment lines keep proxies from closing a stream that has been quiet this long.
_KEEPALIVE_S = 15.0
_QUEUED_POLL_S = 0.5
# How often a stream of a job that another process runs reads the store.
_REMOTE_POLL_S = 0.2
# Progress reaches the store at most this often (the owner's own view is always exact).
_PROGRESS_WRITE_S = 0.2
# The maintenance loop: cancels asked elsewhere every tick; heartbeat, orphans and eviction every few.
_TICK_S = 0.25
_TICKS_PER_BEAT = 4


@dataclass(eq=False)
class Job:
    """A job this process runs, from its submission until its end is in the store."""

    record: JobRecord
    prepared: Prepared
    task: Task | None = None
    runner: asyncio.Task[None] | None = None
    watchers: set[asyncio.Event] = field(default_factory=set)
    # time.monotonic() of the last progress written to the store.
    progress_written: float = 0.0

    def changed(self) -> None:
        for watcher in self.watchers:
            watcher.set()


class Jobs:
    def __init__(
        self,
        generations: Generations,
        store: JobStore,
        *,
        ttl_s: float,
        max_finished: int,
        owner_timeout_s: float = 10.0,
    ) -> None:
        self.generations = generations
        self.store = store
        self.ttl_s = ttl_s
        self.max_finished = max_finished
        self.owner_timeout_s = owner_timeout_s
        # Unique per process start: a restarted server must not take its predecessor's jobs for its own.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._jobs: dict[str, Job] = {}
        self._maintenance: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Beat the first heartbeat, take up orphans, and keep doing both in the background."""
        self.store.heartbeat(self.owner, time.time())
        self._maintenance = asyncio.create_task(self._maintain(), name="jobs-maintenance")

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
        runners = [job.runner for job in self._jobs.values() if job.runner is not None]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        self.store.forget(self.owner)

    # -- what the routes call -------------------------------------------------------------------------

    def create(
        self, body: GenerationRequest, request_id: str, *, timeout_s: float | None = None, tenant: str = ""
    ) -> JobView:
        """Queue ``body`` for ``tenant``; raises InvalidRequest or QueueFull without leaving a job behind."""
        self._evict()
        prepared = self.generations.prepare(body, request_id, timeout_s=timeout_s, tenant=tenant)
        replay = body.model_dump(mode="json", exclude_unset=True)
        replay.update(model=prepared.model.name, seed=prepared.params.seed)
        record = JobRecord(
            id=f"job_{uuid.uuid4().hex}",
            status="queued",
            model=prepared.model.name,
            request_id=request_id,
            seed=prepared.params.seed,
            created=time.time(),
            total_steps=prepared.params.steps_run,
            body=json.dumps(replay),
            timeout_s=timeout_s,
            owner=self.owner,
            tenant=tenant,
        )
        kept = self.generations.reused(prepared)
        if kept is not None:
            # An identical request's kept result: the job is done as it is created, and never queued.
            now = time.time()
            record = dataclasses.replace(
                record,
                status="succeeded",
                started=now,
                finished=now,
                step=record.total_steps,
                result=views.result_json(kept),
            )
            self.store.create(record)
            return self._view(record, None)
        # Stored before it is queued: the worker may write its start before submit returns.
        self.store.create(record)
        try:
            job = self._submit(record, prepared)
        except BaseException:
            self.store.delete(record.id)
            raise
        return self._view(job.record, job)

    def view(self, job_id: str, *, with_result: bool = True, tenant: str | None = None) -> JobView:
        """The job; for ``tenant`` (None: anyone), NotFound when it is another tenant's."""
        job = self._local(job_id, tenant)
        if job is not None:
            return self._view(job.record, job, with_result=with_result)
        return self._view(self._stored(job_id, tenant), None, with_result=with_result)

    def cancel(self, job_id: str, *, tenant: str | None = None) -> JobView:
        """A queued job ends cancelled now; a running one stops at its next step (on whichever process)."""
        job = self._local(job_id, tenant)
        if job is not None:
            if job.record.status in FINAL:
                raise Conflict(f"job {job_id!r} has already {job.record.status}", param="id")
            self.store.request_cancel(job_id)
            self._cancel_local(job)
            return self._view(job.record, job)
        record = self._stored(job_id, tenant)
        if record.status in FINAL:
            raise Conflict(f"job {job_id!r} has already {record.status}", param="id")
        error = _cancelled_detail(record, "cancelled before it started")
        if record.status == "queued" and self.store.cancel_queued(job_id, error, time.time()):
            # Its owner drops it from its queue when it next reads the flags, or when it would start it.
            return self._view(self._stored(job_id), None)
        cancelled = self.store.request_cancel(job_id)
        if cancelled is None:
            raise NotFound(f"no job {job_id!r}", param="id")
        return self._view(cancelled, None)

    def events(self, job_id: str, *, tenant: str | None = None) -> AsyncIterator[str]:
        """Server-sent events: ``queued`` (again whenever the position changes), ``running``,
        ``progress`` per step, then the final status. Raises NotFound now, before any is sent.

        Each carries the job as JSON; only the final one carries the result.
        """
        job = self._local(job_id, tenant)
        if job is None:
            self._stored(job_id, tenant)
        return self._events(job_id, job)

    # -- running a job here ---------------------------------------------------------------------------

    def _local(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job if this process runs it (for ``tenant``, when it is theirs), with a cancel asked
        elsewhere applied (the background loop would apply it within a tick; a view must not show it
        queued meanwhile)."""
        job = self._jobs.get(job_id)
        if job is not None and tenant is not None and job.record.tenant != tenant:
            return None
        if job is not None and job.record.status == "queued" and self.store.cancel_requested(job_id):
            self._cancel_local(job)
        return job

    def _submit(self, record: JobRecord, prepared: Prepared) -> Job:
        """Queue ``record`` (stored already, owned by this process) on a worker; raises QueueFull."""
        job = Job(record=record, prepared=prepared)
        job_id = record.id
        loop = asyncio.get_running_loop()

        # These three run on the worker thread: the store is written there, ahead of the event loop.
        def on_start() -> None:
            started = time.time()
            self._write(job_id, status="running", started=started, queue_position=None)
            loop.call_soon_threadsafe(self._started, job, started)

        def on_step(step: int, total: int) -> None:
            now = time.monotonic()
            if step == total or now - job.progress_written >= _PROGRESS_WRITE_S:
                job.progress_written = now
                self._write(job_id, step=step)
            loop.call_soon_threadsafe(job.changed)

        def poll_cancel() -> bool:
            return self.store.cancel_requested(job_id)

        job.task = self.generations.submit(
            prepared, on_start=on_start, on_step=on_step, poll_cancel=poll_cancel
        )
        self._jobs[job_id] = job
        job.runner = asyncio.create_task(self._run(job), name=job_id)
        self._queue_moved()
        return job

    def _write(self, job_id: str, **changes: object) -> bool:
        """Write this owner's changes; a store that fails is logged, never fatal to the generation."""
        try:
            return self.store.update(job_id, self.owner, **changes)
        except Exception:
            logger.exception("could not write job %s to the job store", job_id)
            return False

    def _started(self, job: Job, started: float) -> None:
        if job.record.status == "queued":
            job.record = dataclasses.replace(
                job.record, status="running", started=started, queue_position=None
            )
            job.changed()
            self._queue_moved()

    def _queue_moved(self) -> None:
        """Wake the watchers of every queued job, and store the positions that changed."""
        for other in list(self._jobs.values()):
            if other.record.status != "queued" or other.task is None:
                continue
            position = self.generations.position(other.prepared, other.task)
            if position is not None and position != other.record.queue_position:
                other.record = dataclasses.replace(other.record, queue_position=position)
                self._write(other.record.id, queue_position=position)
            other.changed()

    def _cancel_local(self, job: Job) -> None:
        assert job.task is not None
        if not self.generations.cancel(job.prepared, job.task):
            return  # running: it stops at its next step, and _run ends it
        # Dropped from the queue: final now, so that the reply to DELETE already says so.
        now = time.time()
        error = _cancelled_detail(job.record, "cancelled before it started")
        if self.store.cancel_queued(job.record.id, error, now):
            job.record = dataclasses.replace(job.record, status="cancelled", error=error, finished=now)
        else:
            job.record = self.store.get(job.record.id) or job.record
        job.changed()
        self._queue_moved()

    async def _run(self, job: Job) -> None:
        assert job.task is not None
        try:
            finished = await self.generations.finish(job.prepared, job.task)
            self._end(job, "succeeded", result=views.result_json(finished))
        except GenerationCancelled as exc:
            self._end(job, "cancelled", error=_detail(exc, job.record))
        except ServerError as exc:
            self._end(job, "failed", error=_detail(exc, job.record))
        except asyncio.CancelledError:
            self.generations.cancel(job.prepared, job.task)
            self._end(job, "cancelled", error=_cancelled_detail(job.record, "the server is shutting down"))
            raise
        except Exception:
            logger.exception("job %s failed", job.record.id)
            error = views.error_json("internal_error", "internal error", job.record.request_id)
            self._end(job, "failed", error=error)

    def _end(self, job: Job, status: str, *, result: str | None = None, error: str | None = None) -> None:
        record = job.record
        if record.status not in FINAL:
            assert job.task is not None
            changes: dict[str, object] = {
                "status": status,
                "finished": time.time(),
                "step": job.task.steps_done,
                "queue_position": None,
                "result": result,
                "error": error,
            }
            if self._write(record.id, **changes):
                job.record = dataclasses.replace(record, **changes)  # type: ignore[arg-type]
            else:
                # Ended elsewhere (cancelled while queued) or taken over: the store has the last word.
                job.record = self.store.get(record.id) or dataclasses.replace(record, **changes)  # type: ignore[arg-type]
        self._jobs.pop(record.id, None)
        job.changed()
        self._evict()

    # -- the background loop --------------------------------------------------------------------------

    async def _maintain(self) -> None:
        tick = 0
        while True:
            try:
                self._remote_cancels()
                if tick % _TICKS_PER_BEAT == 0:
                    now = time.time()
                    self.store.heartbeat(self.owner, now)
                    self._recover(now)
                    self._evict()
            except Exception:
                logger.exception("job store maintenance failed; trying again")
            tick += 1
            await asyncio.sleep(_TICK_S)

    def _remote_cancels(self) -> None:
        """Cancels asked on another process: a running job reads its flag at each step by itself; a
        queued one is taken off the queue here."""
        for job_id in self.store.cancelled(self.owner):
            job = self._jobs.get(job_id)
            if job is not None and job.record.status == "queued" and job.task is not None:
                self._cancel_local(job)

    def _recover(self, now: float) -> None:
        """Claim the jobs of owners that have gone silent, and run them again or end them with a reason."""
        stale_before = now - self.owner_timeout_s
        for job_id in self.store.orphans(stale_before):
            if job_id in self._jobs:
                continue  # this process's own, seen as an orphan because its heartbeat came late
            record = self.store.claim(job_id, self.owner, stale_before)
            if record is not None:
                self._resume(record, now)

    def _resume(self, record: JobRecord, now: float) -> None:
        def fail(code: str, message: str) -> None:
            error = views.error_json(code, message, record.request_id)
            self._write(record.id, status="failed", finished=now, queue_position=None, error=error)
            logger.warning("job %s could not be run again: %s", record.id, message)

        if record.attempts >= MAX_RUNS:
            fail(
                "unavailable",
                f"the server stopped {record.attempts} times while this job was queued or running",
            )
            return
        remaining = None if record.timeout_s is None else record.created + record.timeout_s - now
        if remaining is not None and remaining <= 0:
            fail("deadline_exceeded", "the request's timeout passed before the job could be run again")
            return
        try:
            body = GenerationRequest.model_validate_json(record.body)
            prepared = self.generations.prepare(
                body, record.request_id, timeout_s=remaining, tenant=record.tenant
            )
        except ValidationError as exc:
            fail("invalid_request", f"the stored request is no longer valid: {exc.error_count()} errors")
            return
        except ServerError as exc:
            fail(exc.code, exc.message)
            return
        resumed = dataclasses.replace(
            record, status="queued", started=None, step=0, queue_position=None, attempts=record.attempts + 1
        )
        self._write(
            record.id, status="queued", started=None, step=0, queue_position=None, attempts=resumed.attempts
        )
        try:
            self._submit(resumed, prepared)
        except (QueueFull, Unavailable):
            # Left for later, or for another process with room: nobody owns it meanwhile.
            self._write(record.id, owner="", attempts=record.attempts)
            return
        logger.info("job %s was left unfinished by a stopped server; running it again", record.id)

    def _evict(self) -> None:
        try:
            self.store.evict(time.time(), self.ttl_s, self.max_finished)
        except Exception:
            logger.exception("could not evict finished jobs from the job store")

    # -- views ------------------------------------------------------------------------------------------

    def _stored(self, job_id: str, tenant: str | None = None) -> JobRecord:
        record = self.store.get(job_id)
        expired = (
            record is not None and record.finished is not None and time.time() - record.finished > self.ttl_s
        )
        # Another tenant's job is answered as no job at all: its existence is not theirs to learn.
        others = record is not None and tenant is not None and record.tenant != tenant
        if record is None or expired or others:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept {self.ttl_s:g} s)", param="id")
        return record

    def _view(self, record: JobRecord, job: Job | None, *, with_result: bool = True) -> JobView:
        step, position = record.step, record.queue_position if record.status == "queued" else None
        if job is not None and job.task is not None:
            # The owner's view: the worker's own count, so that a view right after a cancel is exact.
            step = job.task.steps_done
            if record.status == "queued":
                position = self.generations.position(job.prepared, job.task)
        return views.job_view(record, step=step, queue_position=position, with_result=with_result)

    async def _events(self, job_id: str, job: Job | None) -> AsyncIterator[str]:
        watcher = asyncio.Event()
        if job is not None:
            job.watchers.add(watcher)
        sent: tuple[str, int | None, int] | None = None
        last_sent = time.monotonic()
        current: Callable[[], JobRecord]
        if job is not None:
            local = job

            def current() -> JobRecord:
                return local.record

        else:

            def current() -> JobRecord:
                return self._stored(job_id)

        try:
            while True:
                watcher.clear()
                try:
                    record = current()
                except NotFound:
                    return  # evicted while watched: nothing more to say
                if record.status in FINAL:
                    yield _event(record.status, self._view(record, job))
                    return
                view = self._view(record, job, with_result=False)
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
                # queue, which wakes no watcher: look again now and then. Another process's job
                # wakes nothing here at all: read the store.
                if job is None:
                    timeout = _REMOTE_POLL_S
                else:
                    timeout = _QUEUED_POLL_S if record.status == "queued" else _KEEPALIVE_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wait(), timeout)
        finally:
            if job is not None:
                job.watchers.discard(watcher)


def _detail(exc: ServerError, record: JobRecord) -> str:
    return views.error_json(exc.code, exc.message, record.request_id, exc.param)


def _cancelled_detail(record: JobRecord, message: str) -> str:
    return views.error_json("cancelled", message, record.request_id)


def _event(name: str, view: JobView) -> str:
    return f"event: {name}\ndata: {json.dumps(view.model_dump(mode='json'), separators=(',', ':'))}\n\n"
