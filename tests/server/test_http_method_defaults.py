"""A method named with no other field runs with defaults that fit the model, and the card says which."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cache_engine import DBCacheConfig

from .conftest import LiveServer, error_of, live_server

MODELS = ["shapes-flux", "tiny-flux", "tiny-wan"]
STEPS = 4


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=MODELS)


def _cards(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {card["id"]: card for card in client.get("/v1/models").json()["data"]}


def _bare(client: httpx.Client, model: str, method: str, **fields: Any) -> httpx.Response:
    body = {"model": model, "prompt": "a red circle", "seed": 3, "cache": {"method": method}, **fields}
    if model == "tiny-wan":
        body["output_format"] = "gif"
    return client.post("/v1/generations", json=body)


def test_every_method_of_the_default_model_runs_bare(client: httpx.Client) -> None:
    card = _cards(client)["shapes-flux"]
    methods = [method for method in card["cache_methods"] if method != "none"]
    assert "dbcache" in methods
    assert sorted(card["method_defaults"]) == sorted(methods)
    for method in methods:
        response = _bare(client, "shapes-flux", method, steps=STEPS)
        assert response.status_code == 200, (method, response.text)


def test_dbcache_takes_the_models_front_blocks_where_the_reference_default_cannot_act(
    client: httpx.Client,
) -> None:
    fitted = _cards(client)["shapes-flux"]["method_defaults"]["dbcache"]
    # The reference default runs 8 front blocks; shapes-flux caches 6 as one chain.
    assert DBCacheConfig().Fn_compute_blocks == 8
    assert (fitted["Fn_compute_blocks"], fitted["Bn_compute_blocks"]) == (1, 0)
    result = _bare(client, "shapes-flux", "dbcache", steps=STEPS).json()
    assert result["cache_policy"]["Fn_compute_blocks"] == 1
    assert result["cache"]["denoiser_calls"] > 0


def test_a_field_given_still_wins_over_the_fitted_default(client: httpx.Client) -> None:
    body = {
        "model": "shapes-flux",
        "prompt": "a red circle",
        "steps": STEPS,
        "cache": {"method": "dbcache", "Fn_compute_blocks": 2},
    }
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["cache_policy"]["Fn_compute_blocks"] == 2
    too_many = {**body, "cache": {"method": "dbcache", "Fn_compute_blocks": 8}}
    refused = client.post("/v1/generations", json=too_many)
    assert refused.status_code == 422
    assert error_of(refused)["param"] == "cache.Fn_compute_blocks"


def test_the_card_shows_what_a_bare_request_runs_and_omits_what_cannot_run_bare(client: httpx.Client) -> None:
    for model, card in _cards(client).items():
        for method in card["cache_methods"]:
            if method == "none":
                continue
            # At the model's default steps, the ones the card describes.
            response = _bare(client, model, method)
            if method in card["method_defaults"]:
                assert response.status_code == 200, (model, method, response.text)
                ran = response.json()["cache_policy"]
                assert ran == card["method_defaults"][method], (model, method)
            else:
                # Only a field the model cannot fill keeps a method from running bare, and the 422 says so.
                assert response.status_code == 422, (model, method, response.text)
                assert error_of(response)["param"].startswith("cache."), (model, method)
