"""Typed dependencies: the services the lifespan put on ``app.state``, reached from a route."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .jobs import Jobs
from .request_id import request_id_of
from .runtime import Runtime
from .service import Generations


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_generations(request: Request) -> Generations:
    return get_runtime(request).require_generations()


def get_jobs(request: Request) -> Jobs:
    return get_runtime(request).require_jobs()


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
GenerationsDep = Annotated[Generations, Depends(get_generations)]
JobsDep = Annotated[Jobs, Depends(get_jobs)]
RequestIdDep = Annotated[str, Depends(request_id_of)]
