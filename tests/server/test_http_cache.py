"""Each cache method over HTTP: accepted, run, and visible in the stats; `none` is the plain pipeline."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import LiveServer, b64_items, error_of, live_server
from .test_http_families import POLICIES, generate

STEPS = 6
BODIES = {
    "tiny-flux": {
        "model": "tiny-flux",
        "prompt": "a red circle on a blue background",
        "steps": STEPS,
        "seed": 1,
    },
    "tiny-wan": {
        "model": "tiny-wan",
        "prompt": "a bird flying",
        "steps": STEPS,
        "seed": 1,
        "output_format": "gif",
    },
}
# The methods checked here on both tiny models, at test_http_families' settings (which reuse within a
# family's two steps, so within six too); MagCache, SeaCache, DBCache and TeaCache have modules of their own.
METHODS: Mapping[str, Mapping[str, Any]] = {
    method: POLICIES[method]
    for method in ("pyramid_attention_broadcast", "faster_cache", "first_block_cache", "taylorseer")
}


@pytest.fixture(scope="module")
def bare(model_cache: Path) -> Iterator[LiveServer]:
    """The same models served with no cache hooks installed at all."""
    yield from live_server(model_cache, install_cache_hooks=False)


@pytest.fixture(scope="module")
def bare_client(bare: LiveServer) -> Iterator[httpx.Client]:
    with bare.client() as client:
        yield client


@pytest.mark.parametrize("model", sorted(BODIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_runs_and_reuses(client: httpx.Client, model: str, method: str) -> None:
    cache = {"method": method, **METHODS[method]}
    result = generate(client, {**BODIES[model], "cache": cache})
    stats = result["cache"]
    assert stats["method"] == method
    assert result["cache_policy"]["method"] == method
    calls_per_step = 2 if model == "tiny-wan" else 1  # tiny-wan runs classifier-free guidance
    assert stats["denoiser_calls"] == STEPS * calls_per_step
    assert stats["steps_cached"] > 0
    assert stats["blocks_reused"] + stats["attention_reused"] > 0
    assert result["cache_policy"] == {**result["cache_policy"], **_as_sent(METHODS[method])}


def _as_sent(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: [float(v) for v in value] if isinstance(value, list) else value for key, value in fields.items()
    }


def test_caching_changes_the_output_and_none_does_not(client: httpx.Client) -> None:
    body = BODIES["tiny-flux"]
    plain = b64_items(generate(client, body))
    assert b64_items(generate(client, {**body, "cache": {"method": "none"}})) == plain
    cached = generate(client, {**body, "cache": {"method": "first_block_cache", "threshold": 10.0}})
    assert b64_items(cached) != plain


@pytest.mark.parametrize("preset", ["fast", "balanced", "quality"])
def test_presets_expand_to_the_model_policy(client: httpx.Client, preset: str) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    for model, body in BODIES.items():
        result = generate(client, {**body, "cache": {"preset": preset}})
        assert result["cache_policy"] == cards[model]["presets"][preset]
        assert result["cache"]["method"] == cards[model]["presets"][preset]["method"]


@pytest.mark.parametrize("model", sorted(BODIES))
def test_none_is_bit_identical_to_a_server_without_hooks(
    client: httpx.Client, bare_client: httpx.Client, model: str
) -> None:
    body = BODIES[model]
    unhooked = generate(bare_client, body)
    assert unhooked["cache"] is None and unhooked["cache_policy"] == {"method": "none"}
    for cache in (None, {"method": "none"}):
        hooked = generate(client, body if cache is None else {**body, "cache": cache})
        assert b64_items(hooked) == b64_items(unhooked)


def test_a_server_without_hooks_refuses_methods_by_name(bare_client: httpx.Client) -> None:
    card = bare_client.get("/v1/models/tiny-flux").json()
    assert card["cache_methods"] == ["none"] and card["presets"] == {}
    for method in METHODS:
        response = bare_client.post("/v1/generations", json={"prompt": "x", "cache": {"method": method}})
        error = error_of(response)
        assert response.status_code == 422
        assert (error["code"], error["param"]) == ("unsupported_cache_method", "cache.method")
        assert method in error["message"]
    response = bare_client.post("/v1/generations", json={"prompt": "x", "cache": {"preset": "fast"}})
    assert response.status_code == 422 and error_of(response)["param"] == "cache.preset"


def test_engine_refusals_name_the_field(client: httpx.Client) -> None:
    response = client.post(
        "/v1/generations",
        json={
            "prompt": "x",
            "cache": {"method": "faster_cache", "spatial_attention_timestep_skip_range": [700, 100]},
        },
    )
    assert response.status_code == 422
    assert error_of(response)["param"] == "cache.spatial_attention_timestep_skip_range"
