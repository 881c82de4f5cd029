"""The application: ``create_app(settings)``, its lifespan, and every exception handler.

Nothing is loaded when this module is imported or when ``create_app`` runs; the lifespan starts the
model loading and stops the workers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import errors
from .jobs import Jobs
from .protocol import field_path
from .request_id import RequestIdMiddleware, request_id_of
from .routes import ROUTERS
from .runtime import Runtime, load_generations
from .settings import Settings

logger = logging.getLogger(__name__)

# How long shutdown waits for each worker to finish the step it is in.
_STOP_TIMEOUT_S = 30.0
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="ditcache",
        summary="Diffusion transformers over HTTP, with a caching policy per request",
        version="0.1.0",
        lifespan=_lifespan,
    )
    app.state.runtime = Runtime(settings or Settings())
    app.add_middleware(RequestIdMiddleware)
    for router in ROUTERS:
        app.include_router(router)
    _install_handlers(app)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    runtime.state = "loading"
    loader = asyncio.create_task(_load(runtime), name="load-models")
    try:
        yield
    finally:
        runtime.state = "stopping"
        loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        if runtime.jobs is not None:
            await runtime.jobs.close()
        if runtime.generations is not None:
            await anyio.to_thread.run_sync(runtime.generations.stop, _STOP_TIMEOUT_S)


async def _load(runtime: Runtime) -> None:
    settings = runtime.settings
    try:
        generations = await anyio.to_thread.run_sync(load_generations, settings, runtime.metrics)
    except Exception as exc:
        logger.exception("loading the models failed")
        runtime.state, runtime.error = "failed", f"{type(exc).__name__}: {exc}"
        return
    generations.start()
    runtime.generations = generations
    runtime.jobs = Jobs(generations, ttl_s=settings.job_ttl_s, max_finished=settings.max_finished_jobs)
    runtime.state = "ready"
    logger.info("ready: %s", ", ".join(generations.models))


# -- errors: one envelope for all -------------------------------------------------------------------


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.ServerError)
    async def server_error(request: Request, exc: errors.ServerError) -> JSONResponse:
        return errors.from_exception(exc, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_describe(problem) for problem in exc.errors()]
        param = problems[0][0] if problems else None
        message = "; ".join(f"{path}: {text}" if path else text for path, text in problems)
        return errors.envelope(422, "invalid_request", message, request_id_of(request), param=param or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return errors.envelope(
            exc.status_code, code, str(exc.detail), request_id_of(request), headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log (the server logs what Starlette re-raises), never to the client.
        request_id = request_id_of(request)
        logger.error("unhandled %s in request %s", type(exc).__name__, request_id)
        return errors.envelope(500, "internal_error", "internal server error", request_id)


def _describe(problem: dict[str, object]) -> tuple[str, str]:
    """(field path, message) for one pydantic error, in the client's vocabulary."""
    kind = str(problem.get("type", ""))
    loc = problem.get("loc", ())
    assert isinstance(loc, tuple)
    if kind == "json_invalid":
        return "", f"the body is not valid JSON: {problem.get('msg')}"
    path = field_path(loc, kind)
    if kind == "extra_forbidden":
        return path, "unknown field"
    if kind == "missing" and not path:
        return "", "a JSON body is required"
    return path, str(problem.get("msg", "invalid"))
