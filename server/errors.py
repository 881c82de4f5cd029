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
    │   ├── Conflict                     409 conflict            e.g. cancelling a finished job
    │   ├── Unauthorized                 401 unauthorized        a missing or wrong API key
    │   └── PayloadTooLarge              413 payload_too_large   the body is over ``max_body_bytes``
    ├── QueueFull                        429 queue_full          the model's queue is at its bound;
    │                                                             ``Retry-After`` says when to retry
    ├── Unavailable                      503 unavailable         retry later
    │   ├── NotReady                     503 not_ready           models are loading, or the server drains
    │   └── OutOfMemory                  503 out_of_memory       the device ran out of memory mid-run
    ├── DeadlineExceeded                 504 deadline_exceeded   the request's timeout passed; the job
    │                                                             stopped at its next step
    ├── GenerationCancelled              499 cancelled           the job was cancelled (never sent to the
    │                                                             client that cancelled; stored on the job)
    └── GenerationFailed                 500 generation_failed   the pipeline raised; details stay in logs

Framework errors are mapped into the same envelope (``api/envelope.py``) by the handlers in ``api/app.py``: a pydantic
``RequestValidationError`` is a 422 ``invalid_request`` naming the field path, a Starlette
``HTTPException`` keeps its status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


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


class Unauthorized(RequestError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLarge(RequestError):
    status_code = 413
    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the limit of {limit} bytes", param="body")


class QueueFull(ServerError):
    # 429 rather than 503: the server is healthy, this client should slow down (as TGI and vLLM do).
    status_code = 429
    code = "queue_full"

    def __init__(self, model: str, size: int, retry_after_s: int = 1) -> None:
        super().__init__(
            f"the queue for model {model!r} is full ({size} waiting); retry later",
            headers={"Retry-After": str(retry_after_s)},
        )


class Unavailable(ServerError):
    status_code = 503
    code = "unavailable"


class NotReady(Unavailable):
    code = "not_ready"


class OutOfMemory(Unavailable):
    code = "out_of_memory"


class DeadlineExceeded(ServerError):
    status_code = 504
    code = "deadline_exceeded"


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
