"""The OpenAI Images endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..deps import GenerationsDep, RequestIdDep
from ..protocol import ImageGenerationRequest, ImagesResponse
from ..responses import images_response, server_timing

router = APIRouter(tags=["images"])


@router.post("/v1/images/generations")
async def create_image(
    body: ImageGenerationRequest,
    request: Request,
    response: Response,
    generations: GenerationsDep,
    request_id: RequestIdDep,
) -> ImagesResponse:
    prepared = generations.prepare(body.to_native(), request_id, kind="image", size_param="size")
    finished = await generations.run(prepared, request.is_disconnected)
    response.headers["Server-Timing"] = server_timing(finished.timings)
    return images_response(finished)
