"""The API against its own OpenAPI schema: generated requests, every response checked against it.

No request may end in a 5xx, and every response must be declared (status, content type, headers,
body). The server's limits are tightened so that whatever the generator sends is either refused
(422, before any work) or cheap to run. Examples are derandomized, so a run is reproducible.

The schema is loaded from the live server (``from_url``) rather than through ASGI: the ASGI client
does not run the app's lifespan, so no model would load and no generation would ever run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.api.app import create_app
from server.settings import Settings

from .conftest import LiveServer, live_server

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Cheap enough that an accepted generation costs milliseconds.
TIGHT = {"max_steps": 2, "max_n": 1, "max_width": 64, "max_height": 64, "max_pixels": 64 * 64}

_NATIVE: list[dict[str, Any]] = [
    {"prompt": "a red circle", "steps": 1},
    {"prompt": "a red circle", "steps": 2, "cache": {"method": "first_block_cache"}, "output_format": "webp"},
    {"prompt": "waves", "model": "tiny-wan", "steps": 1, "num_frames": 5, "output_format": "gif"},
]
VALID_BODIES: dict[str, list[dict[str, Any]]] = {
    "/v1/generations": _NATIVE,
    "/v1/jobs": _NATIVE,
    "/v1/images/generations": [{"prompt": "a red circle", "steps": 1, "size": "64x64"}],
}


@pytest.fixture(scope="module")
def schema_server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(
        model_cache,
        queue_size=4,
        model_limits={
            "tiny-flux": TIGHT,
            "tiny-wan": {**TIGHT, "max_width": 32, "max_height": 32, "max_frames": 5},
        },
    )


@pytest.fixture(scope="module")
def api_schema(schema_server: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{schema_server.base_url}/openapi.json")


def _operations() -> list[tuple[str, str]]:
    # The schema does not depend on the models, so the app need not start to list its operations.
    paths = create_app(Settings()).openapi()["paths"]
    return [(method.upper(), path) for path, methods in paths.items() for method in methods]


@pytest.mark.parametrize(("method", "path"), _operations())
def test_every_response_is_declared_and_none_is_a_5xx(
    api_schema: schemathesis.BaseSchema, method: str, path: str
) -> None:
    operation = api_schema[path][method]
    strategy = operation.as_strategy()
    # Random strings rarely name a resident model, so random bodies are nearly all refused: these
    # valid ones make sure the checks also see what a generation answers.
    valid_bodies = VALID_BODIES.get(path, [])
    for body in valid_bodies:
        strategy = strategy | st.just(operation.Case(body=body, media_type="application/json"))
    statuses: list[int] = []

    @given(case=strategy)
    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        statuses.append(case.call_and_validate(checks=CHECKS).status_code)

    check()
    if valid_bodies:
        # Some requests were valid and ran, so the checks saw real results, not only refusals.
        assert any(200 <= status < 300 for status in statuses), statuses
