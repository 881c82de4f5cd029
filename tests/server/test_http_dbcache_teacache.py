"""DBCache and TeaCache over HTTP: listed per model, run with reuse, and refused naming the field."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cache_engine import TeaCacheConfig
from server.policy import engine_config as policy
from server.protocol import GenerationRequest

from .conftest import error_of, generated

STEPS = 6
FLUX = {"model": "tiny-flux", "prompt": "a red circle on a blue background", "steps": STEPS, "seed": 1}
WAN = {"model": "tiny-wan", "prompt": "a bird flying", "steps": STEPS, "seed": 1, "output_format": "gif"}


def test_models_list_both_methods(client: httpx.Client) -> None:
    for card in client.get("/v1/models").json()["data"]:
        assert {"dbcache", "teacache"} <= set(card["cache_methods"]), card["id"]


@pytest.mark.parametrize(
    "cache",
    [
        {"method": "dbcache", "Fn_compute_blocks": 1, "residual_diff_threshold": 2.0, "max_warmup_steps": 1},
        {
            "method": "dbcache",
            "Fn_compute_blocks": 1,
            "Bn_compute_blocks": 1,
            "residual_diff_threshold": 2.0,
            "max_warmup_steps": 2,
            "max_continuous_cached_steps": 1,
            "steps_computation_mask": [1, 1, 0, 0, 1, 0],
            "enable_taylorseer": True,
            "taylorseer_order": 2,
        },
        # Flux has the paper's coefficients: none need be given.
        {"method": "teacache", "rel_l1_thresh": 10.0, "num_steps": STEPS},
    ],
)
def test_each_runs_on_tiny_flux_and_reuses_blocks(client: httpx.Client, cache: dict[str, Any]) -> None:
    result = generated(client, {**FLUX, "cache": cache})
    stats = result["cache"]
    assert stats["method"] == cache["method"] == result["cache_policy"]["method"]
    assert stats["denoiser_calls"] == STEPS
    assert stats["steps_cached"] > 0 and stats["blocks_reused"] > 0
    sent = {key: value for key, value in cache.items() if key != "method"}
    applied = {key: result["cache_policy"][key] for key in sent}
    assert applied == {key: float(v) if isinstance(v, float) else v for key, v in sent.items()}


@pytest.mark.parametrize(
    ("cache", "param"),
    [
        ({"method": "dbcache", "taylorseer_order": 3}, "cache.taylorseer_order"),
        ({"method": "dbcache", "steps_computation_mask": [1, 2]}, "cache.steps_computation_mask.1"),
        ({"method": "dbcache", "max_cached_steps": -2}, "cache.max_cached_steps"),
        # Only the model knows it has too few blocks: the engine's refusal names the field.
        ({"method": "dbcache", "Fn_compute_blocks": 8}, "cache.Fn_compute_blocks"),
        ({"method": "dbcache", "Fn_compute_blocks": 2, "Bn_compute_blocks": 9}, "cache.Bn_compute_blocks"),
        ({"method": "teacache", "rel_l1_thresh": -1}, "cache.rel_l1_thresh"),
        ({"method": "teacache", "coefficients": []}, "cache.coefficients"),
        ({"method": "teacache", "num_steps": 0}, "cache.num_steps"),
    ],
)
def test_a_bad_value_is_a_422_naming_the_field(
    client: httpx.Client, cache: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/generations", json={**FLUX, "cache": cache})
    assert response.status_code == 422, response.text
    assert error_of(response)["param"] == param


def test_teacache_needs_coefficients_where_the_paper_gives_none(client: httpx.Client) -> None:
    response = client.post("/v1/generations", json={**WAN, "cache": {"method": "teacache"}})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["param"] == "cache.coefficients" and "coefficients" in error["message"]
    result = generated(
        client, {**WAN, "cache": {"method": "teacache", "rel_l1_thresh": 10.0, "coefficients": [1, 0]}}
    )
    assert result["cache"]["steps_cached"] > 0
    assert result["cache_policy"]["coefficients"] == [1.0, 0.0]


def test_calibrated_coefficients_fill_what_the_request_leaves_out() -> None:
    """The model's calibration data (per method and field) supplies TeaCache's coefficients."""
    calibration = {"teacache": {"coefficients": (2.0, 0.0)}}

    def config(cache: dict[str, Any]) -> Any:
        body = GenerationRequest.model_validate({"prompt": "p", "cache": cache})
        return policy.to_engine_config(body.cache, calibration)

    assert config({"method": "teacache"}) == TeaCacheConfig(coefficients=(2.0, 0.0))
    assert config({"method": "teacache", "coefficients": [3, 1]}) == TeaCacheConfig(coefficients=(3.0, 1.0))
