"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import RuntimeDep
from ..errors import NotReady

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process answers; says nothing about the models."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(runtime: RuntimeDep) -> dict[str, object]:
    """200 once every model is resident and its worker runs; 503 before, after, or if loading failed."""
    if not runtime.ready or runtime.generations is None:
        raise NotReady(runtime.not_ready_reason())
    return {"status": "ready", "models": list(runtime.generations.models)}
