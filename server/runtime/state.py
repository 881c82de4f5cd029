"""What the lifespan builds and the routes reach through ``app.state.runtime``.

Models load in a background thread after start-up, so ``/health`` answers at once and ``/ready``
says 503 until every model is resident (or says why loading failed).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from server.errors import NotReady, Unavailable
from server.runtime.jobs import Jobs
from server.runtime.metrics import Metrics
from server.runtime.service import Generations
from server.settings import Settings

logger = logging.getLogger(__name__)

# draining: a shutdown was asked for; running work may finish, new requests get 503.
State = Literal["loading", "ready", "failed", "draining", "stopping"]


@dataclass
class Runtime:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    state: State = "loading"
    error: str | None = None
    generations: Generations | None = None
    jobs: Jobs | None = None
    # time.monotonic() when draining began; the grace period counts from here.
    drain_started: float | None = None

    def begin_drain(self) -> None:
        """Refuse new work from now on (503); what runs may finish within the grace period, after
        which it is cancelled and answers 503. Safe to call twice."""
        if self.state in ("loading", "ready"):
            self.state = "draining"
        if self.drain_started is not None:
            return
        self.drain_started = time.monotonic()
        # A timer thread, not the event loop: this is also called from a signal handler.
        timer = threading.Timer(self.settings.shutdown_grace_s, self._grace_over)
        timer.daemon = True
        timer.start()

    def _grace_over(self) -> None:
        if self.generations is not None and not self.generations.idle():
            logger.warning("shutdown grace period over: cancelling the work still queued or running")
            self.generations.cancel_all(Unavailable("the server shut down before this request finished"))

    def require_generations(self) -> Generations:
        if self.state != "ready" or self.generations is None:
            raise NotReady(self.not_ready_reason())
        return self.generations

    def require_jobs(self) -> Jobs:
        self.require_generations()
        assert self.jobs is not None
        return self.jobs

    def not_ready_reason(self) -> str:
        if self.state == "failed":
            return f"models failed to load: {self.error}"
        if self.state in ("draining", "stopping"):
            return "the server is shutting down"
        if self.state == "ready" and self.generations is not None and not self.generations.ready:
            return "a model worker has stopped"
        return "models are loading"

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.generations is not None and self.generations.ready
