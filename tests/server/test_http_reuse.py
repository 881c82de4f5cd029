"""Whole results reused, when a request allows it: an identical request with ``"reuse": "exact"`` gets the
very bytes an earlier one got, and says from which request; anything that changes the bytes misses."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import LiveServer, b64_items, generated, live_server, metric

BODY: dict[str, Any] = {
    "model": "tiny-flux",
    "prompt": "a red circle",
    "steps": 3,
    "seed": 11,
    "reuse": "exact",
}


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"])


@pytest.fixture(scope="module")
def keeping_none(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"], result_cache_mb=0)


def _png_b64(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_an_identical_request_gets_the_same_bytes_and_names_the_request_it_came_from(
    client: httpx.Client,
) -> None:
    body = {**BODY, "prompt": "a green square"}
    before = metric(client, "ditcache_generations_total", model="tiny-flux", method="none", outcome="reused")
    first = generated(client, body)
    again = generated(client, body)
    assert first["reused_from"] is None
    assert again["reused_from"] == first["request_id"] != again["request_id"]
    assert b64_items(again) == b64_items(first)
    assert again["cache"] == first["cache"]
    # No pipeline ran for it: no text encoding, no denoising step, and the stages still add up.
    assert "denoising" not in again["timings"] and again["timings"]["denoising_steps"] == []
    assert sum(
        ms for name, ms in again["timings"].items() if name not in ("total", "denoising_steps")
    ) == pytest.approx(again["timings"]["total"])
    assert (
        metric(client, "ditcache_generations_total", model="tiny-flux", method="none", outcome="reused")
        == before + 1
    )
    assert metric(client, "ditcache_result_cache_bytes") > 0


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 12},
        {"prompt": "a red circle!"},
        {"steps": 4},
        {"cache": {"method": "first_block_cache", "threshold": 10.0}},
        {"output_format": "webp"},
        {"width": 48},
        {"image": _png_b64(1)},
    ],
)
def test_anything_that_changes_the_bytes_misses(client: httpx.Client, change: dict[str, Any]) -> None:
    generated(client, BODY)
    changed = generated(client, {**BODY, **change})
    assert changed["reused_from"] is None


def test_the_image_a_request_starts_from_is_part_of_what_matches(client: httpx.Client) -> None:
    body = {**BODY, "image": _png_b64(2), "strength": 0.5}
    first = generated(client, body)
    assert generated(client, body)["reused_from"] == first["request_id"]
    assert generated(client, {**body, "image": _png_b64(3)})["reused_from"] is None


def test_without_a_seed_or_without_leave_nothing_is_reused(client: httpx.Client) -> None:
    unseeded = {key: value for key, value in BODY.items() if key != "seed"}
    assert [generated(client, unseeded)["reused_from"] for _ in range(2)] == [None, None]
    generated(client, BODY)
    assert generated(client, {**BODY, "reuse": "none"})["reused_from"] is None
    without_field = {key: value for key, value in BODY.items() if key != "reuse"}
    assert generated(client, without_field)["reused_from"] is None


def test_a_job_identical_to_an_earlier_request_is_done_as_it_is_created(client: httpx.Client) -> None:
    body = {**BODY, "prompt": "a blue star"}
    first = generated(client, body)
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 202
    view = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert view["status"] == "succeeded" and view["progress"] == {"step": 3, "total_steps": 3}
    assert view["result"]["reused_from"] == first["request_id"]
    assert b64_items(view["result"]) == b64_items(first)


def test_a_server_that_keeps_no_results_computes_every_request(keeping_none: LiveServer) -> None:
    with keeping_none.client() as client:
        answers = [generated(client, BODY) for _ in range(2)]
    assert [answer["reused_from"] for answer in answers] == [None, None]
    assert b64_items(answers[0]) == b64_items(answers[1])
