"""The error answers each route declares in the OpenAPI schema, all in the one envelope."""

from __future__ import annotations

from typing import Any

from server.protocol import ErrorResponse

_WHY = {
    400: "The request cannot be read",
    401: "A missing or wrong API key (when the server has one)",
    404: "No such resource",
    406: "The Accept header asks for a type the endpoint cannot give",
    409: "The resource is in a state that forbids this",
    413: "The body is over the server's max_body_bytes",
    422: "A field or header is invalid or over the model's limits; param names it",
    429: "The model's queue is full; Retry-After says when to try again",
    500: "An unexpected error, or the pipeline failed",
    503: "Models are loading, the server is draining, or the device ran out of memory",
    504: "The request's timeout passed; the generation stopped at its next step",
}

# What every /v1 route can answer, whatever it does.
V1 = (401, 413, 422, 500, 503)
GENERATION = (*V1, 429, 504)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in sorted(set(statuses))}
