"""The OpenAI Images endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.deps import GenerationsDep, RequestIdDep, TimeoutDep
from server.api.openapi import GENERATION, errors
from server.api.responses import server_timing
from server.protocol import ImageGenerationRequest, ImagesResponse
from server.runtime.views import images_response

router = APIRouter(tags=["images"])


@router.post("/v1/images/generations", responses=errors(*GENERATION))
async def create_image(
    body: ImageGenerationRequest,
    request: Request,
    response: Response,
    generations: GenerationsDep,
    request_id: RequestIdDep,
    timeout_s: TimeoutDep,
) -> ImagesResponse:
    prepared = generations.prepare(
        body.to_native(), request_id, kind="image", size_param="size", timeout_s=timeout_s
    )
    finished = await generations.run(prepared, request.is_disconnected)
    response.headers["Server-Timing"] = server_timing(finished.timings)
    return images_response(finished)
