"""MagCache and SeaCache over HTTP on tiny-flux: run and counted, listed per model, and refused values
named by their field; MagCache's per-checkpoint ratios come from the request or from the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cache_engine import MagCacheConfig
from server.policy import engine_config as policy
from server.protocol import GenerationRequest

from .conftest import LiveServer, error_of, live_server

STEPS = 6
BODY: dict[str, Any] = {"model": "tiny-flux", "prompt": "a red circle", "steps": STEPS, "seed": 1}
RATIOS = [1.0, 1.1, 1.05, 1.0, 0.98, 0.95]
# Settings that reuse blocks within six steps, whatever the weights.
POLICIES: dict[str, dict[str, Any]] = {
    "mag_cache": {"threshold": 1.0, "num_inference_steps": STEPS, "mag_ratios": RATIOS},
    "sea_cache": {"threshold": 10.0, "num_inference_steps": STEPS},
}


@pytest.fixture(scope="module")
def flux(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"])


@pytest.fixture(scope="module")
def client(flux: LiveServer) -> Iterator[httpx.Client]:
    with flux.client() as client:
        yield client


@pytest.mark.parametrize("method", sorted(POLICIES))
def test_each_method_runs_and_reuses(client: httpx.Client, method: str) -> None:
    response = client.post("/v1/generations", json={**BODY, "cache": {"method": method, **POLICIES[method]}})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["cache"]["method"] == method
    assert result["cache"]["blocks_reused"] > 0 and result["cache"]["steps_cached"] > 0
    assert result["cache_policy"] == {**result["cache_policy"], "method": method, **POLICIES[method]}


@pytest.mark.parametrize(
    ("method", "values", "param"),
    [
        ("mag_cache", {"threshold": -1.0}, "cache.threshold"),
        ("mag_cache", {"retention_ratio": 1.5}, "cache.retention_ratio"),
        ("mag_cache", {"mag_ratios": []}, "cache.mag_ratios"),
        ("mag_cache", {"calibrate": True}, "cache.calibrate"),
        ("sea_cache", {"residual_order": 2}, "cache.residual_order"),
        ("sea_cache", {"power_exp": 0}, "cache.power_exp"),
        ("sea_cache", {"raw_vision_callback": "x"}, "cache.raw_vision_callback"),
    ],
)
def test_a_bad_field_is_named(client: httpx.Client, method: str, values: dict[str, Any], param: str) -> None:
    cache = {"method": method, **POLICIES[method], **values}
    response = client.post("/v1/generations", json={**BODY, "cache": cache})
    assert response.status_code == 422
    error = error_of(response)
    assert (error["code"], error["param"]) == ("invalid_request", param)


def test_mag_cache_without_ratios_for_the_model_is_refused(client: httpx.Client) -> None:
    cache = {"method": "mag_cache", "num_inference_steps": STEPS}
    response = client.post("/v1/generations", json={**BODY, "cache": cache})
    assert response.status_code == 422
    error = error_of(response)
    assert (error["code"], error["param"]) == ("invalid_request", "cache.mag_ratios")
    assert "mag_ratios" in error["message"]


def test_models_list_both_methods(client: httpx.Client) -> None:
    cards = client.get("/v1/models").json()["data"]
    assert cards
    for card in cards:
        assert {"mag_cache", "sea_cache"} <= set(card["cache_methods"]), card["id"]


def test_a_models_calibration_fills_what_the_request_leaves_out() -> None:
    calibration = {"mag_cache": {"mag_ratios": (1.0, 0.9)}}
    unset = GenerationRequest.model_validate({"prompt": "p", "cache": {"method": "mag_cache"}})
    config = policy.to_engine_config(unset.cache, calibration)
    assert config == MagCacheConfig(mag_ratios=(1.0, 0.9))
    given = GenerationRequest.model_validate(
        {"prompt": "p", "cache": {"method": "mag_cache", "mag_ratios": [1.0, 1.2, 1.1]}}
    )
    assert policy.to_engine_config(given.cache, calibration) == MagCacheConfig(mag_ratios=(1.0, 1.2, 1.1))
    # Without calibration, the config is built and refused where it is planned on the model.
    assert policy.to_engine_config(unset.cache) == MagCacheConfig()
