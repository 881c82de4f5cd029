"""Images and videos over real HTTP: every format, JSON or raw, with seed, request id, timings, stats."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from cache_engine import METHOD_NAMES

from .conftest import b64_items, decode_image, decode_video, error_of, metric

STEPS = 3
VIDEO = {"model": "tiny-wan", "prompt": "a red fish swimming", "steps": STEPS, "seed": 5}
STAGES = ("queue_wait", "text_encoding", "denoising", "decoding", "pipeline_overhead", "encoding", "total")


def _check_result_fields(body: dict[str, Any], response: httpx.Response, steps: int) -> None:
    assert body["request_id"] == response.headers["x-request-id"]
    assert isinstance(body["seed"], int)
    timings = body["timings"]
    assert all(timings[stage] >= 0 for stage in STAGES)
    assert len(timings["denoising_steps"]) == steps
    assert [m.group(1) for m in re.finditer(r"(\w+);dur=", response.headers["server-timing"])] == list(STAGES)
    assert body["cache"]["method"] == "none" and body["cache_policy"] == {"method": "none"}
    assert body["cache"]["steps_computed"] == body["cache"]["denoiser_calls"] > 0


def _stage_sums(client: httpx.Client) -> dict[str, float]:
    return {
        stage: metric(client, "ditcache_generation_stage_seconds_sum", model="tiny-flux", stage=stage)
        for stage in STAGES
    }


def test_the_stages_add_up_to_total_in_the_body_the_header_and_the_metrics(client: httpx.Client) -> None:
    before = _stage_sums(client)
    response = client.post(
        "/v1/generations",
        json={
            "model": "tiny-flux",
            "prompt": "a red circle",
            "steps": 4,
            "seed": 2,
            "width": 64,
            "height": 64,
        },
    )
    assert response.status_code == 200, response.text
    timings = response.json()["timings"]
    parts = [timings[stage] for stage in STAGES[:-1]]
    assert all(ms > 0 for ms in parts), timings
    assert sum(parts) == pytest.approx(timings["total"], rel=0.01)
    header = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"(\w+);dur=([0-9.]+)", response.headers["server-timing"])
    }
    # Each value is rounded to 0.1 ms.
    assert sum(header[stage] for stage in STAGES[:-1]) == pytest.approx(
        header["total"], rel=0.01, abs=0.05 * len(STAGES)
    )
    after = _stage_sums(client)
    observed = {stage: after[stage] - before[stage] for stage in STAGES}
    assert observed["total"] == pytest.approx(timings["total"] / 1000, rel=1e-6)
    assert sum(observed[stage] for stage in STAGES[:-1]) == pytest.approx(observed["total"], rel=0.01)


def test_health_and_ready(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["models"] == ["tiny-flux", "tiny-wan"]


def test_models_list_kinds_methods_defaults_limits_presets(client: httpx.Client) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert set(cards) == {"tiny-flux", "tiny-wan"}
    assert (cards["tiny-flux"]["kind"], cards["tiny-wan"]["kind"]) == ("image", "video")
    for card in cards.values():
        # Every method the engine has runs on the tiny models; "none" is always there, first.
        assert card["cache_methods"] == ["none", *METHOD_NAMES]
        assert set(card["presets"]) == {"fast", "balanced", "quality"}
        assert all(preset["method"] in card["cache_methods"] for preset in card["presets"].values())
        assert card["limits"]["max_width"] >= card["defaults"]["width"]
    assert cards["tiny-wan"]["output_formats"] == ["mp4", "gif", "webp"]
    assert cards["tiny-wan"]["defaults"]["num_frames"] == 5
    assert client.get("/v1/models/tiny-wan").json() == cards["tiny-wan"]
    assert error_of(client.get("/v1/models/nope"))["code"] == "model_not_found"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_openai_images_in_every_format(client: httpx.Client, fmt: str) -> None:
    response = client.post(
        "/v1/images/generations",
        json={"prompt": "a blue square", "size": "48x32", "n": 2, "output_format": fmt, "steps": STEPS},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int)
    assert (body["size"], body["output_format"], body["model"]) == ("48x32", fmt, "tiny-flux")
    items = b64_items(body)
    assert len(items) == 2 and items[0] != items[1]
    for item in items:
        image = decode_image(item)
        assert (str(image.format).lower(), image.size) == (fmt, (48, 32))
    _check_result_fields(body, response, STEPS)


def test_openai_url_response_format_is_refused_clearly(client: httpx.Client) -> None:
    error = error_of(client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"}))
    assert error["param"] == "response_format"
    assert "not supported" in error["message"] and "b64_json" in error["message"]


def test_openai_endpoint_refuses_video_models(client: httpx.Client) -> None:
    response = client.post("/v1/images/generations", json={"prompt": "x", "model": "tiny-wan"})
    assert response.status_code == 422 and error_of(response)["param"] == "model"


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp"])
def test_native_videos_in_every_format(client: httpx.Client, fmt: str) -> None:
    response = client.post(
        "/v1/generations", json={**VIDEO, "output_format": fmt, "width": 48, "height": 32, "num_frames": 9}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["kind"], body["output_format"], body["num_frames"], body["fps"]) == ("video", fmt, 9, 8)
    (item,) = b64_items(body)
    assert decode_video(item, fmt) == ((48, 32), 9)
    _check_result_fields(body, response, STEPS)
    # Classifier-free guidance: two denoiser calls per step.
    assert body["cache"]["denoiser_calls"] == 2 * STEPS


def test_native_image_defaults_to_png_at_the_model_size(client: httpx.Client) -> None:
    response = client.post("/v1/generations", json={"prompt": "a cat", "steps": STEPS, "seed": 11})
    body = response.json()
    assert (body["model"], body["media_type"], body["seed"]) == ("tiny-flux", "image/png", 11)
    (item,) = b64_items(body)
    assert decode_image(item).size == (64, 64)


@pytest.mark.parametrize(
    ("accept", "extra", "content_type", "fmt"),
    [
        ("image/png", {"model": "tiny-flux"}, "image/png", "png"),
        ("image/jpeg", {"model": "tiny-flux"}, "image/jpeg", "jpeg"),
        ("video/mp4", {}, "video/mp4", "mp4"),
        ("image/gif", {}, "image/gif", "gif"),
        ("image/webp", {"output_format": "webp"}, "image/webp", "webp"),
    ],
)
def test_raw_media_when_accept_asks(
    client: httpx.Client, accept: str, extra: dict[str, Any], content_type: str, fmt: str
) -> None:
    body = {**VIDEO, **extra}
    response = client.post("/v1/generations", json=body, headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == content_type
    if body["model"] == "tiny-wan":
        assert decode_video(response.content, fmt) == ((32, 32), 5)
    else:
        assert decode_image(response.content).size == (64, 64)
    assert response.headers["x-seed"] == "5"
    assert "denoising;dur=" in response.headers["server-timing"]
    assert len(response.headers["x-denoising-steps-ms"].split(",")) == STEPS
    assert '"method":"none"' in response.headers["x-cache-stats"]
    assert response.headers["x-request-id"]


def test_raw_and_json_carry_the_same_media(client: httpx.Client) -> None:
    body = {"prompt": "a green tree", "steps": STEPS, "seed": 3}
    raw = client.post("/v1/generations", json=body, headers={"Accept": "image/png"}).content
    (from_json,) = b64_items(client.post("/v1/generations", json=body).json())
    assert raw == from_json


def test_raw_media_refusals(client: httpx.Client) -> None:
    two = client.post("/v1/generations", json={"prompt": "x", "n": 2}, headers={"Accept": "image/png"})
    assert two.status_code == 406 and error_of(two)["code"] == "not_acceptable"
    clash = client.post(
        "/v1/generations", json={"prompt": "x", "output_format": "png"}, headers={"Accept": "image/jpeg"}
    )
    assert clash.status_code == 406
    wrong_kind = client.post("/v1/generations", json={"prompt": "x"}, headers={"Accept": "video/mp4"})
    assert wrong_kind.status_code == 406


def test_request_id_is_taken_from_the_client_or_made(client: httpx.Client) -> None:
    response = client.post(
        "/v1/generations", json={"prompt": "x", "steps": 1}, headers={"X-Request-Id": "client-id-42"}
    )
    assert response.headers["x-request-id"] == "client-id-42" == response.json()["request_id"]
    forged = client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert forged.headers["x-request-id"].startswith("req_")
    error = client.get("/v1/jobs/none", headers={"X-Request-Id": "err-1"})
    assert error_of(error)["request_id"] == "err-1"


def test_random_seed_is_reported_and_reproduces(client: httpx.Client) -> None:
    first = client.post("/v1/generations", json={"prompt": "a dog", "steps": STEPS}).json()
    again = client.post(
        "/v1/generations", json={"prompt": "a dog", "steps": STEPS, "seed": first["seed"]}
    ).json()
    assert b64_items(first) == b64_items(again)


def test_openapi_schema_renders(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/images/generations", "/v1/generations", "/v1/jobs", "/v1/jobs/{job_id}/events"} <= set(paths)
