"""CORS only when configured, and the API key, checked on the app alone (no models are loaded).

Without its lifespan the app has no models, so a request that passes the key check gets 503
not_ready: that is how these tests see the check passed. Only the headers of a real result need a
live server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from server.api.app import create_app
from server.logs import JsonFormatter, RequestIdFilter, bound_request_id
from server.settings import Settings

from .conftest import LiveServer, live_server

ORIGIN = "https://app.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}


def call(settings: Settings, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_no_cors_headers_unless_origins_are_configured() -> None:
    plain = Settings()
    simple = call(plain, "GET", "/health", headers={"Origin": ORIGIN})
    assert simple.status_code == 200
    assert not any(name.startswith("access-control-") for name in simple.headers)
    preflight = call(plain, "OPTIONS", "/v1/generations", headers=PREFLIGHT)
    assert not any(name.startswith("access-control-") for name in preflight.headers)


def test_cors_allows_only_the_configured_origins() -> None:
    settings = Settings(cors_origins=[ORIGIN])
    allowed = call(settings, "GET", "/health", headers={"Origin": ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()
    preflight = call(settings, "OPTIONS", "/v1/generations", headers=PREFLIGHT)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    other = call(settings, "GET", "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.fixture(scope="module")
def cors_server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"], cors_origins=[ORIGIN])


def test_cors_exposes_every_header_a_result_carries(cors_server: LiveServer) -> None:
    """A browser client reading raw media sees only exposed headers; a result header left out is lost."""
    with cors_server.client() as client:
        response = client.post(
            "/v1/generations",
            json={"prompt": "a red circle", "steps": 2, "cache": {"method": "first_block_cache"}},
            headers={"Origin": ORIGIN, "Accept": "image/png"},
        )
    assert response.status_code == 200
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    ours = {name for name in response.headers if name.startswith("x-") or name == "server-timing"}
    assert {"x-request-id", "x-seed", "x-cache-stats", "server-timing"} <= ours <= exposed
    assert "retry-after" in exposed


def test_cors_origins_come_from_the_environment_as_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DITCACHE_CORS_ORIGINS", f"{ORIGIN}, https://b.example")
    assert Settings().cors_origins == [ORIGIN, "https://b.example"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": "Bearer s3cret-but-longer"}, 401),
        ({"Authorization": "Bearer s3cret"}, 503),
    ],
)
def test_the_key_is_checked_before_anything_else(headers: dict[str, str], status: int) -> None:
    response = call(Settings(api_key=SecretStr("s3cret")), "GET", "/v1/models", headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == ("unauthorized" if status == 401 else "not_ready")


def test_without_a_key_nothing_is_asked() -> None:
    response = call(Settings(), "GET", "/v1/models")
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"


def test_the_key_never_shows_in_settings_output() -> None:
    assert "s3cret" not in repr(Settings(api_key=SecretStr("s3cret")))


def test_json_log_lines_carry_the_bound_request_id() -> None:
    record = logging.LogRecord("server.x", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    with bound_request_id("req-42"):
        RequestIdFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-42"
    assert (line["level"], line["logger"], line["message"]) == ("info", "server.x", "hello there")
