"""Typed dependencies: the services the lifespan put on ``app.state``, reached from a route."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from server.api.request_id import request_id_of
from server.errors import InvalidRequest
from server.runtime.jobs import Jobs
from server.runtime.service import Generations
from server.runtime.state import Runtime

TIMEOUT_HEADER = "X-Request-Timeout"


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_generations(request: Request) -> Generations:
    return get_runtime(request).require_generations()


def get_jobs(request: Request) -> Jobs:
    return get_runtime(request).require_jobs()


def get_timeout(
    request: Request,
    timeout: Annotated[
        float | None,
        Header(
            alias=TIMEOUT_HEADER,
            gt=0,
            description="seconds this request may take, at most the server's request_timeout_s; "
            "past it the generation stops at its next step and the answer is 504",
        ),
    ] = None,
) -> float:
    """The request's time budget: what the client asks for, bounded by the server's."""
    bound = get_runtime(request).settings.request_timeout_s
    if timeout is None:
        return bound
    if timeout > bound:
        raise InvalidRequest(
            f"{TIMEOUT_HEADER} is over the server's limit of {bound:g} s, got {timeout:g}",
            param=TIMEOUT_HEADER,
        )
    return timeout


def get_tenant(request: Request) -> str:
    """The tenant the request's API key names ("" without keys, or with ``api_key``)."""
    return str(getattr(request.state, "tenant", ""))


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
GenerationsDep = Annotated[Generations, Depends(get_generations)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
RequestIdDep = Annotated[str, Depends(request_id_of)]
TimeoutDep = Annotated[float, Depends(get_timeout)]
TenantDep = Annotated[str, Depends(get_tenant)]
