"""One access log line and the request metrics per HTTP request.

The route is the path template (``/v1/jobs/{job_id}``), never the raw path, so that the metrics'
label values stay few however many ids clients send.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.runtime.metrics import Metrics

logger = logging.getLogger("server.api.access")


class AccessMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.request_done(route, method, status, seconds)
            logger.info(
                "%s %s %d %.1f ms",
                method,
                scope.get("path", ""),
                status,
                seconds * 1000,
                extra={"status": status, "route": route, "duration_ms": round(seconds * 1000, 1)},
            )
