"""The application: ``create_app(settings)``, its lifespan, and every exception handler.

Nothing is loaded when this module is imported or when ``create_app`` runs; the lifespan starts the
model loading and, at shutdown, drains: running and queued work gets what is left of
``shutdown_grace_s`` to finish, then whatever remains is cancelled and the workers stop.

Middleware, outermost first: request id (and its log context), access log and request metrics,
CORS (only with ``cors_origins``), the body size limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server import errors
from server.api import envelope
from server.api.access import AccessMiddleware
from server.api.auth import require_api_key
from server.api.body_limit import BodySizeLimitMiddleware
from server.api.openapi import errors as error_responses
from server.api.request_id import HEADER as REQUEST_ID_HEADER
from server.api.request_id import RequestIdMiddleware, request_id_of
from server.api.routes import ADMIN_ROUTERS, OPEN_ROUTERS, V1_ROUTERS, docs, playground
from server.protocol import field_path
from server.runtime.job_store import open_store
from server.runtime.jobs import Jobs
from server.runtime.loading import load_generations
from server.runtime.state import Runtime
from server.settings import Settings

logger = logging.getLogger(__name__)

# After the grace period, how long shutdown waits for each worker to finish the step it is in.
_STOP_TIMEOUT_S = 30.0
_DRAIN_POLL_S = 0.05
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
    settings = settings or Settings()
    app = FastAPI(
        title="ditcache",
        summary="Diffusion transformers over HTTP, with a caching policy per request",
        version="0.1.0",
        lifespan=_lifespan,
        # Any route can fail unexpectedly; the envelope is the same everywhere.
        responses=error_responses(500),
        # FastAPI's pages load their scripts from a CDN; routes.docs serves the same pages with local files.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    runtime = Runtime(settings)
    app.state.runtime = runtime
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Accept", REQUEST_ID_HEADER, "X-Request-Timeout"],
            expose_headers=[
                REQUEST_ID_HEADER,
                "Server-Timing",
                "X-Seed",
                "X-Cache-Stats",
                "X-Denoising-Steps-Ms",
                "Retry-After",
            ],
        )
    app.add_middleware(AccessMiddleware, metrics=runtime.metrics)
    app.add_middleware(RequestIdMiddleware)
    for router in OPEN_ROUTERS:
        app.include_router(router)
    for router in V1_ROUTERS:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    for router in ADMIN_ROUTERS:
        app.include_router(router)
    app.include_router(docs.router)
    if not settings.disable_playground:
        # Its own key check: a browser opening the page can send the key only as HTTP Basic.
        app.include_router(playground.router)
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
        runtime.begin_drain()
        loader.cancel()
        await asyncio.gather(loader, return_exceptions=True)
        await _drain(runtime)
        runtime.state = "stopping"
        if runtime.jobs is not None:
            await runtime.jobs.close()
            runtime.jobs.store.close()
        if runtime.generations is not None:
            await anyio.to_thread.run_sync(runtime.generations.stop, _STOP_TIMEOUT_S)


async def _drain(runtime: Runtime) -> None:
    """Wait, within what is left of the grace period, for every worker to run out of work."""
    generations = runtime.generations
    if generations is None:
        return
    assert runtime.drain_started is not None
    deadline = runtime.drain_started + runtime.settings.shutdown_grace_s
    # The runtime's timer cancels what is left when the grace period ends; this waits for the
    # cancelled work to answer (within a step) before the workers are stopped.
    while not generations.idle() and time.monotonic() < deadline + _STOP_TIMEOUT_S:
        await asyncio.sleep(_DRAIN_POLL_S)


async def _load(runtime: Runtime) -> None:
    settings = runtime.settings
    try:
        generations = await anyio.to_thread.run_sync(load_generations, settings, runtime.metrics)
    except Exception as exc:
        logger.exception("loading the models failed")
        runtime.state, runtime.error = "failed", f"{type(exc).__name__}: {exc}"
        return
    try:
        store = await anyio.to_thread.run_sync(open_store, settings.job_store, settings.cache_dir)
    except Exception as exc:
        logger.exception("opening the job store failed")
        runtime.state, runtime.error = "failed", f"job store: {type(exc).__name__}: {exc}"
        return
    generations.start()
    runtime.generations = generations
    runtime.jobs = Jobs(
        generations,
        store,
        ttl_s=settings.job_ttl_s,
        max_finished=settings.max_finished_jobs,
        owner_timeout_s=settings.job_owner_timeout_s,
    )
    await runtime.jobs.start()
    runtime.state = "ready"
    logger.info("ready: %s", ", ".join(generations.models))


# -- errors: one envelope for all -------------------------------------------------------------------


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.ServerError)
    async def server_error(request: Request, exc: errors.ServerError) -> JSONResponse:
        return envelope.from_exception(exc, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [_describe(problem) for problem in exc.errors()]
        param = problems[0][0] if problems else None
        message = "; ".join(f"{path}: {text}" if path else text for path, text in problems)
        return envelope.envelope(422, "invalid_request", message, request_id_of(request), param=param or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return envelope.envelope(
            exc.status_code, code, str(exc.detail), request_id_of(request), headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log (the server logs what Starlette re-raises), never to the client.
        request_id = request_id_of(request)
        logger.error("unhandled %s in request %s", type(exc).__name__, request_id)
        return envelope.envelope(500, "internal_error", "internal server error", request_id)


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
