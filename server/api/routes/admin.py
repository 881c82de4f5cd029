"""Adapters added and removed while serving: ``/v1/admin``, behind the admin key, absent without one.

A source is a path under ``lora_dir``, never outside it: an absolute path, ``..`` or a symbolic link
leading out is refused. Removing an adapter answers once the requests running with it are done; a
request still queued that names it is answered 409.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.auth import bearer_matches
from server.api.deps import GenerationsDep, RuntimeDep
from server.api.openapi import V1, errors
from server.errors import InvalidRequest, NotFound, Unauthorized
from server.protocol import AdapterRequest, AdapterView

_bearer = HTTPBearer(auto_error=False, description="the server's admin_key")


def require_admin_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    secret = request.app.state.runtime.settings.admin_key
    if secret is None:
        raise NotFound("no admin endpoints on this server: set DITCACHE_ADMIN_KEY to have them")
    if not bearer_matches(credentials, secret):
        raise Unauthorized("the admin routes need 'Authorization: Bearer <admin key>'")


router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin_key)])


def confined(lora_dir: Path | None, source: str) -> Path:
    """``source`` under ``lora_dir``; raises InvalidRequest naming ``source`` for anything else."""
    if lora_dir is None:
        raise InvalidRequest("this server reads no adapters while serving: set lora_dir", param="source")
    relative = PurePosixPath(source)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts or "\\" in source:
        raise InvalidRequest("source is a path under lora_dir, without '..'", param="source")
    root = lora_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise InvalidRequest("source leads out of lora_dir", param="source")
    if not path.exists():
        raise InvalidRequest(f"no adapter at {source!r} under lora_dir", param="source")
    return path


@router.post("/v1/admin/models/{model}/loras", status_code=201, responses=errors(*V1, 404, 409))
async def add_adapter(
    model: str, body: AdapterRequest, generations: GenerationsDep, runtime: RuntimeDep
) -> AdapterView:
    settings = runtime.settings
    source = confined(settings.lora_dir, body.source)
    adapter = await anyio.to_thread.run_sync(
        lambda: generations.add_adapter(model, body.name, source, max_loras=settings.max_loras)
    )
    return AdapterView(
        name=adapter.name, rank=adapter.rank, modules=len(adapter.modules), bytes=adapter.bytes
    )


@router.delete("/v1/admin/models/{model}/loras/{name}", responses=errors(*V1, 404))
async def remove_adapter(model: str, name: str, generations: GenerationsDep) -> dict[str, str]:
    await anyio.to_thread.run_sync(lambda: generations.remove_adapter(model, name))
    return {"removed": name}
