"""Run an app under uvicorn so that a SIGTERM drains it: 503 for new requests at once, running work
gets ``shutdown_grace_s`` to finish, then the rest is cancelled and the process exits.
"""

from __future__ import annotations

import math
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.runtime.state import Runtime
from server.settings import Settings

# Time after the grace period for cancelled requests to get their 503 out.
_ANSWER_S = 10


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Before uvicorn closes its sockets: a request that still arrives on an open connection
        # is refused in the envelope rather than queued behind the work that is draining.
        self.runtime.begin_drain()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, settings: Settings) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Logging is set up by logs.configure; the access log comes from AccessMiddleware.
        log_config=None,
        access_log=False,
        # The grace period, then time for cancelled work to stop at its next step and answer.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + _ANSWER_S,
    )
    DrainingServer(config, app.state.runtime).run()
