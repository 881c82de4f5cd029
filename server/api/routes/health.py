"""Liveness, readiness and metrics: open even when the /v1 routes need an API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from server.api.deps import RuntimeDep
from server.api.openapi import errors
from server.errors import NotReady

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process answers; says nothing about the models."""
    return {"status": "ok"}


@router.get("/ready", responses=errors(500, 503))
async def ready(runtime: RuntimeDep) -> dict[str, object]:
    """200 once every model is resident and its worker runs; 503 before, after, or if loading failed."""
    if not runtime.ready or runtime.generations is None:
        raise NotReady(runtime.not_ready_reason())
    return {"status": "ready", "models": list(runtime.generations.models)}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics: requests, queue depth, jobs in flight, stage latencies, cache reuse."""
    body, content_type = runtime.metrics.render()
    return Response(body, media_type=content_type)
