"""Errors the server answers with, and the one JSON envelope they all travel in.

Every error response, whatever raised it, has the body
``{"error": {"code": str, "message": str, "request_id": str, "param": str (when a field is at fault)}}``
and an ``X-Request-Id`` header. The tree, with the HTTP status and ``code`` each class answers with::

    ServerError                          500 internal_error      (also: anything not in this tree)
    ├── RequestError                     400 invalid_request     the client can fix the request
    │   ├── InvalidRequest               422 invalid_request     a field is wrong; ``param`` names it
    │   │   ├── UnknownModel             422 model_not_found     param "model"
    │   │   └── UnsupportedCacheMethod   422 unsupported_cache_method   param "cache.method" (or
    │   │                                                                 "cache.preset")
    │   ├── NotAcceptable                406 not_acceptable      the Accept header cannot be met
    │   ├── NotFound                     404 not_found           e.g. an unknown job id
    │   └── Conflict                     409 conflict            e.g. cancelling a finished job
    ├── Unavailable                      503 unavailable         retry later
    │   ├── NotReady                     503 not_ready           models are still loading (or failed to)
    │   └── QueueFull                    503 queue_full          the model's queue is at its bound
    ├── GenerationCancelled              499 cancelled           the job was cancelled (never sent to the
    │                                                             client that cancelled; stored on the job)
    └── GenerationFailed                 500 generation_failed   the pipeline raised; details stay in logs

Framework errors are mapped into the same envelope by the handlers in ``app.py``: a pydantic
``RequestValidationError`` is a 422 ``invalid_request`` naming the field path, a Starlette
``HTTPException`` keeps its status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi.responses import JSONResponse


class ServerError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})


class RequestError(ServerError):
    status_code = 400
    code = "invalid_request"


class InvalidRequest(RequestError):
    status_code = 422


class UnknownModel(InvalidRequest):
    code = "model_not_found"

    def __init__(self, name: str, available: tuple[str, ...]) -> None:
        super().__init__(
            f"model {name!r} is not served here; resident models: {', '.join(available) or 'none'}",
            param="model",
        )


class UnsupportedCacheMethod(InvalidRequest):
    code = "unsupported_cache_method"

    def __init__(self, message: str, *, param: str = "cache.method") -> None:
        super().__init__(message, param=param)


class NotAcceptable(RequestError):
    status_code = 406
    code = "not_acceptable"


class NotFound(RequestError):
    status_code = 404
    code = "not_found"


class Conflict(RequestError):
    status_code = 409
    code = "conflict"


class Unavailable(ServerError):
    status_code = 503
    code = "unavailable"


class NotReady(Unavailable):
    code = "not_ready"


class QueueFull(Unavailable):
    code = "queue_full"

    def __init__(self, model: str, size: int) -> None:
        super().__init__(
            f"the queue for model {model!r} is full ({size} waiting); retry later",
            headers={"Retry-After": "1"},
        )


class GenerationCancelled(ServerError):
    # 499 is nginx's "client closed request": the nearest status for a request its client withdrew.
    status_code = 499
    code = "cancelled"


class GenerationFailed(ServerError):
    code = "generation_failed"


def error_body(
    code: str, message: str, request_id: str | None, param: str | None = None
) -> dict[str, dict[str, Any]]:
    error: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if param is not None:
        error["param"] = param
    return {"error": error}


def envelope(
    status_code: int,
    code: str,
    message: str,
    request_id: str | None,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error response every handler returns."""
    all_headers = dict(headers or {})
    if request_id is not None:
        all_headers["X-Request-Id"] = request_id
    return JSONResponse(
        error_body(code, message, request_id, param), status_code=status_code, headers=all_headers
    )


def from_exception(exc: ServerError, request_id: str | None) -> JSONResponse:
    return envelope(exc.status_code, exc.code, exc.message, request_id, param=exc.param, headers=exc.headers)
