"""The OpenAI Images endpoints: generations (JSON) and edits (a multipart form, as the OpenAI SDK sends it)."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server.api.deps import GenerationsDep, RequestIdDep, TimeoutDep, get_tenant
from server.api.openapi import GENERATION, errors
from server.api.responses import server_timing
from server.errors import InvalidRequest
from server.protocol import GenerationRequest, ImageEditRequest, ImageGenerationRequest, ImagesResponse
from server.runtime.service import Generations
from server.runtime.views import images_response

router = APIRouter(tags=["images"])

# The form's file fields: one image, or several as the SDK sends a list (``image[]``), and a mask.
_IMAGE_FIELDS = ("image", "image[]")
_MASK_FIELD = "mask"
# A form without files (its images as base64 text) may come URL-encoded.
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# Bounds on the form's parts, so that a hostile body cannot make the parser keep thousands of them.
_MAX_FILES = 17
_MAX_FIELDS = 32

_EDIT_FORM: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG, JPEG or WebP to edit (several as image[] where the model takes them)",
                        },
                        "mask": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG of the image's size whose transparent pixels are the ones to change",
                        },
                        **{
                            name: {"type": "string", "description": field.description or name}
                            for name, field in ImageEditRequest.model_fields.items()
                        },
                    },
                }
            }
        },
    }
}


@router.post("/v1/images/generations", responses=errors(*GENERATION))
async def create_image(
    body: ImageGenerationRequest,
    request: Request,
    response: Response,
    generations: GenerationsDep,
    request_id: RequestIdDep,
    timeout_s: TimeoutDep,
) -> ImagesResponse:
    return await _answer(body.to_native(), request, response, generations, request_id, timeout_s)


@router.post("/v1/images/edits", responses=errors(*GENERATION, 400), openapi_extra=_EDIT_FORM)
async def edit_image(
    request: Request,
    response: Response,
    generations: GenerationsDep,
    request_id: RequestIdDep,
    timeout_s: TimeoutDep,
) -> ImagesResponse:
    images, mask, fields = await _edit_form(request)
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:
        # The app's handler names the field, as it does for a JSON body.
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from exc
    return await _answer(body.to_edit(images, mask), request, response, generations, request_id, timeout_s)


async def _answer(
    body: GenerationRequest,
    request: Request,
    response: Response,
    generations: Generations,
    request_id: str,
    timeout_s: float,
) -> ImagesResponse:
    """Run ``body`` for an OpenAI Images endpoint: its ``size`` is blamed for a size the model refuses."""
    prepared = generations.prepare(
        body, request_id, kind="image", size_param="size", timeout_s=timeout_s, tenant=get_tenant(request)
    )
    finished = await generations.run(prepared, request.is_disconnected)
    response.headers["Server-Timing"] = server_timing(finished.timings)
    return images_response(finished)


async def _edit_form(request: Request) -> tuple[list[str], str | None, dict[str, str]]:
    """The form's images and mask (as base64 text) and its other fields; raises InvalidRequest."""
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith(_FORM_TYPES):
        raise InvalidRequest("an image edit is a multipart/form-data body, as the OpenAI SDK sends it")
    try:
        form = await request.form(max_files=_MAX_FILES, max_fields=_MAX_FIELDS)
    except Exception as exc:  # the multipart parser's own errors, whatever their class
        raise InvalidRequest(f"the multipart body could not be read: {exc}") from exc
    images: list[str] = []
    mask: str | None = None
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if name in _IMAGE_FIELDS:
            images.append(await _base64(value))
        elif name == _MASK_FIELD:
            if mask is not None:
                raise InvalidRequest("one mask at most", param="mask")
            mask = await _base64(value)
        elif isinstance(value, UploadFile):
            raise InvalidRequest(f"{name} is a file; only image and mask are", param=name)
        elif name in fields:
            raise InvalidRequest(f"{name} is given twice", param=name)
        else:
            fields[name] = value
    if not images:
        raise InvalidRequest("an image edit needs an image", param="image")
    return images, mask, fields


async def _base64(value: UploadFile | str) -> str:
    """A file part's bytes as base64 text; a text part is taken as base64 already."""
    if isinstance(value, str):
        return value
    return base64.b64encode(await value.read()).decode("ascii")
