"""Every request gets an id: the client's ``X-Request-Id`` when it is sane, a fresh one otherwise.

The id is put on ``request.state.request_id`` before anything else runs and echoed in the response's
``X-Request-Id`` header, and bound to ``logs.request_id_var`` so that every log line of the request
carries it. Error responses built outside this middleware (the catch-all 500) add the
header themselves from the same state.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.logs import bound_request_id

HEADER = "X-Request-Id"
# Ids end up in logs and headers: keep them short and free of anything that could forge a line.
_SANE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def request_id_of(request: Request) -> str:
    found = getattr(request.state, "request_id", None)
    return found if isinstance(found, str) else new_request_id()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = Request(scope).headers.get(HEADER, "")
        request_id = offered if _SANE.fullmatch(offered) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        with bound_request_id(request_id):
            await self.app(scope, receive, send_with_id)
