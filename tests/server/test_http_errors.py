"""Bad requests are 422s naming the field, leave nothing queued, and the server keeps serving.

Every error, whatever raised it, comes in the one envelope, with the request id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.errors import GenerationFailed

from .conftest import LiveServer, b64_items, error_of, wait_until

ENDPOINTS = ("/v1/generations", "/v1/jobs", "/v1/images/generations")
GOOD = {"prompt": "a red circle", "steps": 2, "seed": 4}

# (body, field the error must name); each is wrong on every endpoint.
BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({**GOOD, "prompt_2": "x"}, "prompt_2"),
    ({**GOOD, "steps": "2"}, "steps"),
    ({**GOOD, "steps": 0}, "steps"),
    ({**GOOD, "n": 2.5}, "n"),
    ({**GOOD, "model": "tiny-sd"}, "model"),
    ({**GOOD, "model": 3}, "model"),
    ({"steps": 2}, "prompt"),
    ({**GOOD, "seed": -1}, "seed"),
    ({**GOOD, "steps": 101}, "steps"),
    ({**GOOD, "n": 9}, "n"),
    ({**GOOD, "prompt": "x" * 1001}, "prompt"),
    ({**GOOD, "cache": {"method": "warpcache"}}, "cache.method"),
    ({**GOOD, "cache": {"method": "first_block_cache", "treshold": 0.1}}, "cache.treshold"),
    ({**GOOD, "cache": {"method": "taylorseer", "cache_interval": "5"}}, "cache.cache_interval"),
    (
        {
            **GOOD,
            "cache": {
                "method": "pyramid_attention_broadcast",
                "spatial_attention_timestep_skip_range": [1, 2, 3],
            },
        },
        "cache.spatial_attention_timestep_skip_range",
    ),
    ({**GOOD, "cache": {"preset": "turbo"}}, "cache.preset"),
    ({**GOOD, "cache": "fast"}, "cache"),
]
NATIVE_ONLY: list[tuple[dict[str, Any], str]] = [
    ({**GOOD, "width": 65}, "width"),
    ({**GOOD, "height": 512}, "height"),
    ({**GOOD, "num_frames": 5}, "num_frames"),
    ({**GOOD, "output_format": "mp4"}, "output_format"),
    ({**GOOD, "output_format": "tiff"}, "output_format"),
    ({**GOOD, "model": "tiny-wan", "num_frames": 6}, "num_frames"),
    ({**GOOD, "model": "tiny-wan", "width": 40}, "width"),
    ({**GOOD, "model": "tiny-wan", "output_format": "png"}, "output_format"),
]
OPENAI_ONLY: list[tuple[dict[str, Any], str]] = [
    ({**GOOD, "size": "65x64"}, "size"),
    ({**GOOD, "size": "1024x1024"}, "size"),
    ({**GOOD, "size": "big"}, "size"),
    ({**GOOD, "response_format": "url"}, "response_format"),
    ({**GOOD, "output_format": "gif"}, "output_format"),
    ({**GOOD, "width": 64}, "width"),
]


def _cases() -> Iterator[Any]:
    for endpoint in ENDPOINTS:
        extra = OPENAI_ONLY if endpoint == "/v1/images/generations" else NATIVE_ONLY
        for index, (body, field) in enumerate(BAD_BODIES + extra):
            yield pytest.param(endpoint, body, field, id=f"{endpoint}-{field}-{index}")


@pytest.mark.parametrize(("endpoint", "body", "field"), list(_cases()))
def test_bad_body_is_422_naming_the_field(
    server: LiveServer, client: httpx.Client, endpoint: str, body: dict[str, Any], field: str
) -> None:
    response = client.post(endpoint, json=body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["param"] == field
    assert error["message"]
    assert server.queue_depths() == {"tiny-flux": 0, "tiny-wan": 0}


def test_after_bad_bodies_nothing_is_queued_and_the_server_serves(
    server: LiveServer, client: httpx.Client
) -> None:
    for body, _ in BAD_BODIES:
        client.post("/v1/jobs", json=body)
    jobs = server.runtime.jobs
    assert jobs is not None and jobs._jobs == {}
    assert server.queue_depths() == {"tiny-flux": 0, "tiny-wan": 0}
    response = client.post("/v1/generations", json=GOOD)
    assert response.status_code == 200 and len(b64_items(response.json())) == 1


def test_messages_name_what_is_wrong(client: httpx.Client) -> None:
    unknown = error_of(client.post("/v1/generations", json={**GOOD, "model": "tiny-sd"}))
    assert unknown["code"] == "model_not_found" and "tiny-sd" in unknown["message"]
    assert "tiny-flux" in unknown["message"]
    method = error_of(client.post("/v1/generations", json={**GOOD, "cache": {"method": "warpcache"}}))
    assert "warpcache" in method["message"] and "first_block_cache" in method["message"]
    several = error_of(client.post("/v1/generations", json={"prompt": 1, "steps": "x", "bogus": 0}))
    assert several["param"] == "prompt"
    assert all(name in several["message"] for name in ("prompt", "steps", "bogus"))


def test_not_json_and_wrong_routes_use_the_envelope(client: httpx.Client) -> None:
    broken = client.post(
        "/v1/generations", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 422 and "JSON" in error_of(broken)["message"]
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    wrong_method = client.put("/v1/generations", json=GOOD)
    assert wrong_method.status_code == 405 and error_of(wrong_method)["code"] == "method_not_allowed"


def test_pipeline_runtime_error_is_a_5xx_without_traceback(server: LiveServer, client: httpx.Client) -> None:
    # A fake, because nothing a client can send makes the pipeline raise: the transformer fails as
    # a device error would.
    generations = server.runtime.generations
    assert generations is not None
    transformer = generations.models["tiny-flux"].pipeline.transformer
    original = transformer.forward

    def device_error(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    transformer.forward = device_error
    try:
        response = client.post("/v1/generations", json=GOOD, headers={"X-Request-Id": "boom-1"})
    finally:
        transformer.forward = original
    assert response.status_code == GenerationFailed.status_code == 500
    error = error_of(response)
    assert (error["code"], error["request_id"]) == ("generation_failed", "boom-1")
    assert "Traceback" not in response.text and "illegal memory" not in response.text
    assert client.post("/v1/generations", json=GOOD).status_code == 200


def test_unexpected_errors_are_500_without_traceback(server: LiveServer) -> None:
    # A route added only here, because no route of the app can be made to raise a bare KeyError.
    async def broken() -> None:
        raise KeyError("secret internal detail")

    server.app.add_api_route("/test-only/broken", broken)
    with server.client() as client:
        response = client.get("/test-only/broken", headers={"X-Request-Id": "bug-1"})
    assert response.status_code == 500
    assert error_of(response) == {
        "code": "internal_error",
        "message": "internal server error",
        "request_id": "bug-1",
    }
    assert "secret" not in response.text


def test_a_server_whose_model_fails_to_load_is_alive_but_not_ready(model_cache: Path) -> None:
    from server.settings import Settings

    failing = LiveServer(Settings(cache_dir=model_cache, models=["no-such-model"]))
    failing._thread.start()
    try:
        with failing.client() as client:
            wait_until(lambda: failing.runtime.state != "loading", 60, "the end of loading")
            assert client.get("/health").status_code == 200
            ready = client.get("/ready")
            assert ready.status_code == 503
            error = error_of(ready)
            assert error["code"] == "not_ready" and "no-such-model" in error["message"]
            refused = client.post("/v1/generations", json=GOOD)
            assert refused.status_code == 503 and error_of(refused)["code"] == "not_ready"
    finally:
        failing.stop()
