"""The one error envelope every HTTP answer of an error takes: ``{"error": {code, message, request_id, param}}``."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse

from server.errors import ServerError, error_body


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
