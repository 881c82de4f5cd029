"""Native generations, images and videos: base64 in JSON, or raw media when the Accept header asks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response

from server.api.deps import GenerationsDep, RequestIdDep, TimeoutDep, get_tenant
from server.api.openapi import GENERATION, errors
from server.api.responses import negotiate, raw_response, server_timing
from server.errors import NotAcceptable
from server.models import media
from server.protocol import GenerationRequest, GenerationResponse
from server.runtime.views import generation_response

router = APIRouter(tags=["generations"])

_RAW_TYPES = sorted({t for types in media.MEDIA_TYPES.values() for t in types.values()})
_RAW: dict[int | str, dict[str, Any]] = {
    **errors(*GENERATION, 406),
    200: {
        "description": "JSON by default; the media itself when Accept names its type "
        "(timings in Server-Timing, cache stats in X-Cache-Stats)",
        "content": {media_type: {} for media_type in _RAW_TYPES},
    },
}


@router.post("/v1/generations", response_model=GenerationResponse, responses=_RAW)
async def create_generation(
    body: GenerationRequest,
    request: Request,
    response: Response,
    generations: GenerationsDep,
    request_id: RequestIdDep,
    timeout_s: TimeoutDep,
    accept: Annotated[str | None, Header()] = None,
) -> GenerationResponse | Response:
    model = generations.resolve_model(body.model)
    raw_format = negotiate(accept, model.kind, body.output_format)
    if raw_format is not None:
        if body.n != 1:
            raise NotAcceptable("a raw media response holds one item: send n=1, or Accept: application/json")
        body = body.model_copy(update={"output_format": raw_format})
    prepared = generations.prepare(
        body, request_id, timeout_s=timeout_s, model=model, tenant=get_tenant(request)
    )
    finished = await generations.run(prepared, request.is_disconnected)
    if raw_format is not None:
        return raw_response(finished)
    response.headers["Server-Timing"] = server_timing(finished.timings)
    return generation_response(finished)
