"""One worker per resident model copy, fed by a bounded queue.

The worker is the only code that runs its model's pipeline. With ``max_batch`` 1 it runs one
generation at a time, on one thread, so the text encoding, denoising and decoding of one request never
interleave with another's. With ``max_batch`` N, N threads each run a generation, and the model copy's
``ForwardBatcher`` merges their transformer forwards (``cache_engine.batching``): each still runs its
own pipeline call under its own cache session, on its own copy of the scheduler. Cancellation and
deadlines are checked by the step callback between denoising steps; raising from that callback stops
the pipeline (of that request only).

A generation that raises (an out-of-memory error, any exception from the pipeline) fails only its
own task: the cache session is discarded by its context manager, and the loop takes the next task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from cache_engine import CacheConfig, SessionStats
from cache_engine.batching import BatchMember, BatchStats, ForwardBatcher
from server.errors import (
    DeadlineExceeded,
    GenerationCancelled,
    GenerationFailed,
    OutOfMemory,
    QueueFull,
    ServerError,
    Unavailable,
)
from server.logs import bound_request_id
from server.models.generation import GenerationParams, GenerationResult, generate
from server.models.registry import ResidentModel
from server.models.trajectories import TrajectoryRun

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    result: GenerationResult
    stats: SessionStats | None
    queue_wait_ms: float
    # The worker's run, from taking the task to its result (the pipeline's stages are inside it).
    run_ms: float
    # time.perf_counter() when the result was ready: where encoding's time starts.
    finished_at: float
    # How its transformer forwards were merged with other requests'; None: the worker runs one at a time.
    batch: BatchStats | None = None


class _StopRequested(Exception):
    """Raised from the step callback to unwind the pipeline; never leaves the worker."""


@dataclass(eq=False)
class Task:
    """One generation waiting for, or running on, a worker. Callbacks run on the worker thread."""

    request_id: str
    params: GenerationParams
    config: CacheConfig | None
    on_start: Callable[[], None] | None = None
    on_step: Callable[[int, int], None] | None = None
    # Written by the worker thread only: denoising steps finished so far.
    steps_done: int = 0
    future: Future[Outcome] = field(default_factory=Future)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    # time.perf_counter() when the request arrived: its queue wait counts from there.
    enqueued_at: float = field(default_factory=time.perf_counter)
    # time.monotonic() past which the task stops at its next step (504); None: no deadline.
    deadline: float | None = None
    # What a cancelled task answers; None: GenerationCancelled.
    cancel_reason: ServerError | None = None
    # The worker that took it (the model's least loaded replica's), set by Worker.submit.
    worker: Worker | None = None
    # Asked before the task starts and at the end of each step: True cancels it. For a cancel that
    # another process asks for (a job's flag in the shared store), which no local call can deliver.
    poll_cancel: Callable[[], bool] | None = None
    # Its part in the trajectories kept across requests; None: it neither resumes one nor keeps its own.
    trajectory: TrajectoryRun | None = None
    # Whose request it is: the prompt embeddings it may reuse are that tenant's.
    tenant: str = ""
    # Its place in the worker's merged forwards, from the moment a thread takes it; None: it runs alone.
    member: BatchMember | None = None

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def poll(self) -> None:
        """Raise the cancel flag if ``poll_cancel`` says so; a failing poll cancels nothing."""
        if self.poll_cancel is None or self.cancel_requested.is_set():
            return
        try:
            if self.poll_cancel():
                self.cancel_requested.set()
        except Exception:
            logger.warning("could not read the cancel flag of %s", self.request_id, exc_info=True)


class Worker:
    def __init__(
        self,
        model: ResidentModel,
        *,
        max_queue: int,
        retry_after_s: int = 1,
        replica: str = "0",
        max_batch: int = 1,
        batch_wait_ms: float = 0.0,
        on_merged_run: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.replica = replica
        self.max_batch = max_batch
        self._queue: deque[Task] = deque()
        self._running: list[Task] = []
        self._condition = threading.Condition()
        self._stopping = False
        self.batcher = (
            ForwardBatcher(wait_s=batch_wait_ms / 1000, arriving=self._arriving, on_run=on_merged_run)
            if max_batch > 1
            else None
        )
        self._threads = [
            threading.Thread(target=self._loop, name=f"worker-{model.name}-{replica}-{index}", daemon=True)
            for index in range(max_batch)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads) and not self._stopping

    @property
    def queue_depth(self) -> int:
        with self._condition:
            return len(self._queue)

    @property
    def busy(self) -> int:
        """The tasks running now (at most ``max_batch``)."""
        with self._condition:
            return len(self._running)

    def idle(self) -> bool:
        with self._condition:
            return not self._running and not self._queue

    def _arriving(self) -> bool:
        # Read without the lock: the batcher asks while holding its own, which submit never takes.
        return bool(self._queue) and len(self._running) < self.max_batch

    def submit(self, task: Task) -> None:
        with self._condition:
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.model.name, len(self._queue), self.retry_after_s)
            task.worker = self
            self._queue.append(task)
            self._condition.notify()

    def position(self, task: Task) -> int | None:
        """0 for the next task to run; None once it has left the queue."""
        with self._condition:
            try:
                return self._queue.index(task)
            except ValueError:
                return None

    def cancel(self, task: Task, reason: ServerError | None = None) -> bool:
        """A queued task is dropped at once (returns True); a running one stops at its next step.

        ``reason`` is what a dropped task's future raises (default: GenerationCancelled).
        """
        if task.cancel_reason is None:
            task.cancel_reason = reason
        task.cancel_requested.set()
        with self._condition:
            try:
                self._queue.remove(task)
            except ValueError:
                return False
        task.future.set_exception(reason or GenerationCancelled("cancelled before it started"))
        return True

    def cancel_all(self, reason: ServerError) -> None:
        """Drop every queued task and stop the running one at its next step, all answering ``reason``."""
        with self._condition:
            tasks = [*self._queue, *self._running]
        for task in tasks:
            self.cancel(task, reason)

    def stop(self, timeout: float | None = None) -> None:
        with self._condition:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            for running in self._running:
                running.cancel_requested.set()
            self._condition.notify_all()
        for task in waiting:
            task.future.set_exception(Unavailable("the server is shutting down"))
        for thread in self._threads:
            thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                task = self._queue.popleft()
                self._running.append(task)
                if self.batcher is not None:
                    # Admitted here, with the queue's lock held, so that the requests taken together
                    # are all waited for before the first of them runs a forward.
                    task.member = self.batcher.admit()
            try:
                with bound_request_id(task.request_id):
                    member = task.member.bound() if task.member is not None else nullcontext()
                    with member:
                        self._run(task)
            finally:
                with self._condition:
                    self._running.remove(task)

    def _run(self, task: Task) -> None:
        started = time.perf_counter()
        queue_wait_ms = (started - task.enqueued_at) * 1000
        task.poll()
        if task.cancel_requested.is_set():
            task.future.set_exception(GenerationCancelled("cancelled before it started"))
            return
        if task.expired():
            task.future.set_exception(DeadlineExceeded("the request's timeout passed while it was queued"))
            return
        total_steps = task.params.steps_run

        def on_step_end(step: int) -> None:
            task.steps_done = step + 1
            if task.member is not None and step + 1 >= total_steps:
                # Decoding comes next: the others' forwards no longer wait for this request's.
                task.member.leave_loop()
            task.poll()
            if task.cancel_requested.is_set() or task.expired():
                raise _StopRequested
            if task.on_step is not None:
                task.on_step(step + 1, total_steps)

        try:
            if task.on_start is not None:
                task.on_start()
            with self.model.cache.session(task.config, request_id=task.request_id) as run:
                result = generate(
                    self.model,
                    task.params,
                    on_step_end=on_step_end,
                    trajectory=task.trajectory,
                    tenant=task.tenant,
                    own_scheduler=task.member is not None,
                )
            stats = run.stats
        except Exception as exc:
            task.future.set_exception(self._failure(task, exc))
            return
        finished = time.perf_counter()
        task.future.set_result(
            Outcome(
                result=result,
                stats=stats,
                queue_wait_ms=queue_wait_ms,
                run_ms=(finished - started) * 1000,
                finished_at=finished,
                batch=task.member.stats if task.member is not None else None,
            )
        )

    def _failure(self, task: Task, exc: Exception) -> ServerError:
        """What the client hears about a generation that raised; the details go to the log only."""
        # The pipeline may wrap what the callback raised, so the flags decide, not the type. The
        # deadline comes first: a waiter that sees it pass also cancels the task.
        if task.expired():
            return DeadlineExceeded(f"the request's timeout passed after {task.steps_done} steps")
        if task.cancel_requested.is_set():
            return task.cancel_reason or GenerationCancelled("cancelled during denoising")
        if isinstance(exc, ServerError):
            # Raised for the client already (an adapter removed while the request waited).
            return exc
        if isinstance(exc, torch.OutOfMemoryError):
            logger.error("generation %s on %s ran out of memory", task.request_id, self.model.name)
            # Hand the failed run's cached blocks back to the device, so that the next job can fit.
            if self.model.pipeline.device.type == "cuda":
                torch.cuda.empty_cache()
            return OutOfMemory("the device ran out of memory; retry with a smaller request or later")
        logger.exception("generation %s on %s failed", task.request_id, self.model.name)
        return GenerationFailed(f"generation failed: {type(exc).__name__}")
