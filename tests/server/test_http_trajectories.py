"""Similar prompts over HTTP: ``"reuse": {"similar": ...}`` starts from an earlier request's kept trajectory,
and says so; what one tenant's requests keep (trajectories, prompt embeddings, results, jobs) is never
another tenant's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import LiveServer, b64_items, error_of, generated, live_server, metric

KEYS = {"team-a": "key-of-team-a", "team-b": "key-of-team-b"}
SIMILAR: dict[str, Any] = {"similar": {}}
BODY: dict[str, Any] = {"model": "tiny-flux", "prompt": "a red circle", "steps": 5, "reuse": SIMILAR}


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux", "tiny-wan"], api_keys=KEYS)


@pytest.fixture(scope="module")
def team_a(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(headers={"Authorization": f"Bearer {KEYS['team-a']}"}) as client:
        yield client


@pytest.fixture(scope="module")
def team_b(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client(headers={"Authorization": f"Bearer {KEYS['team-b']}"}) as client:
        yield client


def test_a_similar_prompt_starts_from_the_earlier_trajectory_and_says_which(
    team_a: httpx.Client,
) -> None:
    body = {**BODY, "prompt": "a yellow star"}
    skipped_before = metric(team_a, "ditcache_trajectory_steps_skipped_total", model="tiny-flux")
    first = generated(team_a, {**body, "seed": 1})
    assert first["reused_trajectory"] is None
    assert metric(team_a, "ditcache_trajectory_cache_bytes", model="tiny-flux", replica="0") > 0
    again = generated(team_a, {**body, "seed": 2})
    reused = again["reused_trajectory"]
    assert reused["request_id"] == first["request_id"]
    assert reused["similarity"] == 1.0 and reused["same_prompt"]
    # The uncalibrated rule: the same prompt skips up to 90% of 5 steps, at a kept step (1, 2 or 4).
    assert reused["steps_skipped"] == 4
    # The same conditioning from the same kept latents: the earlier request's image, to the byte.
    assert b64_items(again) == b64_items(first)
    assert len(again["timings"]["denoising_steps"]) == 5
    skipped = metric(team_a, "ditcache_trajectory_steps_skipped_total", model="tiny-flux")
    assert skipped == skipped_before + 4


def test_a_request_may_bound_the_steps_it_skips(team_a: httpx.Client) -> None:
    body = {**BODY, "prompt": "a green triangle"}
    generated(team_a, {**body, "seed": 1})
    bounded = generated(team_a, {**body, "seed": 2, "reuse": {"similar": {"max_skipped_steps": 1}}})
    assert bounded["reused_trajectory"]["steps_skipped"] == 1
    floor = generated(team_a, {**body, "seed": 3, "reuse": {"similar": {"max_skipped_steps": 0}}})
    assert floor["reused_trajectory"] is None


def test_another_tenant_never_starts_from_it(team_a: httpx.Client, team_b: httpx.Client) -> None:
    body = {**BODY, "prompt": "a blue square"}
    first = generated(team_a, {**body, "seed": 1})
    theirs = generated(team_b, {**body, "seed": 1})
    assert theirs["reused_trajectory"] is None
    # Same prompt, same seed, computed from its own noise: the same image as team A's first.
    assert b64_items(theirs) == b64_items(first)
    # Nor did team A's prompt embeddings answer team B's encodings.
    assert theirs["text_cache"]["hits"] == 0
    mine = generated(team_a, {**body, "seed": 5})
    assert mine["reused_trajectory"]["request_id"] == first["request_id"]
    assert mine["text_cache"]["hits"] > 0


def test_another_tenant_never_gets_its_kept_result(team_a: httpx.Client, team_b: httpx.Client) -> None:
    body = {"model": "tiny-flux", "prompt": "a white circle", "steps": 2, "seed": 4, "reuse": "exact"}
    first = generated(team_a, body)
    assert generated(team_b, body)["reused_from"] is None
    assert generated(team_a, body)["reused_from"] == first["request_id"]


def test_another_tenants_job_is_no_job(team_a: httpx.Client, team_b: httpx.Client) -> None:
    created = team_a.post("/v1/jobs", json={"model": "tiny-flux", "prompt": "a cat", "steps": 2})
    assert created.status_code == 202, created.text
    job = created.json()["id"]
    for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/events"):
        response = team_b.get(path)
        assert response.status_code == 404 and error_of(response)["param"] == "id"
    assert team_b.delete(f"/v1/jobs/{job}").status_code == 404
    assert team_a.get(f"/v1/jobs/{job}").status_code == 200


def test_each_key_is_needed(server: LiveServer) -> None:
    with server.client() as anonymous:
        assert anonymous.post("/v1/generations", json=BODY).status_code == 401
    with server.client(headers={"Authorization": "Bearer key-of-team-c"}) as stranger:
        assert stranger.post("/v1/generations", json=BODY).status_code == 401


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # Wan's scheduler (UniPC) does not leave latents alone under a zero velocity.
        ({**BODY, "model": "tiny-wan"}, "reuse"),
        ({**BODY, "reuse": {"similar": {"min_similarity": 2}}}, "reuse.similar.min_similarity"),
        ({**BODY, "reuse": {"similar": {"max_skipped_steps": -1}}}, "reuse.similar.max_skipped_steps"),
        ({**BODY, "reuse": {"similar": {"steps": 3}}}, "reuse.similar.steps"),
        ({**BODY, "reuse": "similar"}, "reuse"),
    ],
)
def test_a_request_that_cannot_start_along_a_trajectory_is_refused_naming_the_field(
    team_a: httpx.Client, body: dict[str, Any], param: str
) -> None:
    response = team_a.post("/v1/generations", json=body)
    assert response.status_code == 422, response.text
    assert error_of(response)["param"] == param


def test_an_image_task_is_refused_naming_reuse(team_a: httpx.Client) -> None:
    from .test_http_reuse import _png_b64

    response = team_a.post("/v1/generations", json={**BODY, "image": _png_b64(3), "strength": 0.5})
    assert response.status_code == 422, response.text
    assert error_of(response)["param"] == "reuse"


def test_a_server_that_keeps_none_says_so(model_cache: Path) -> None:
    for server in live_server(model_cache, models=["tiny-flux"], trajectory_cache_mb=0):
        with server.client() as client:
            response = client.post("/v1/generations", json=BODY)
            assert response.status_code == 422
            assert error_of(response)["param"] == "reuse"
            assert "trajectory_cache_mb" in error_of(response)["message"]
