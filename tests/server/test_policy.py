"""body.cache → the engine's frozen config, and back; presets and targets resolved on a model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from cache_engine import (
    CacheConfig,
    FasterCacheConfig,
    FirstBlockCacheConfig,
    InvalidConfigValue,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from server.errors import InvalidRequest
from server.models.registry import ResidentModel, load_model
from server.policy import engine_config as policy
from server.policy import resolve
from server.protocol import POLICY_CLASSES, GenerationRequest

PRESETS: Mapping[str, CacheConfig | None] = {
    "fast": FirstBlockCacheConfig(threshold=0.2),
    "quality": None,
}


def _config(cache: dict[str, Any] | None) -> Any:
    body = GenerationRequest.model_validate({"prompt": "p", "cache": cache})
    return policy.to_engine_config(body.cache)


@pytest.fixture(scope="module")
def flux(model_cache: Path) -> ResidentModel:
    return load_model("tiny-flux", cache_dir=model_cache)


def _resolved(model: ResidentModel, cache: dict[str, Any]) -> resolve.Resolved:
    body = GenerationRequest.model_validate({"prompt": "p", "cache": cache})
    return resolve.resolve(model, body.cache, steps=4, guidance_scale=1.0)


def test_none_and_absent_mean_no_config() -> None:
    assert _config(None) is None
    assert _config({"method": "none"}) is None


def test_each_method_builds_its_engine_config_with_the_given_values() -> None:
    assert _config({"method": "first_block_cache", "threshold": 0.3}) == FirstBlockCacheConfig(threshold=0.3)
    assert _config(
        {"method": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1, "use_lite_mode": True}
    ) == TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True)
    pab = _config(
        {
            "method": "pyramid_attention_broadcast",
            "spatial_attention_block_skip_range": 3,
            "spatial_attention_timestep_skip_range": [0, 1000],
        }
    )
    assert pab == PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=3, spatial_attention_timestep_skip_range=(0, 1000)
    )
    assert _config({"method": "faster_cache", "alpha_low_frequency": 1.3}) == FasterCacheConfig(
        alpha_low_frequency=1.3
    )


def test_presets_come_from_the_model(flux: ResidentModel) -> None:
    model = dataclasses.replace(flux, presets=PRESETS)
    assert _resolved(model, {"preset": "fast"}) == resolve.Resolved(PRESETS["fast"], param="cache.preset")
    assert _resolved(model, {"preset": "quality"}) == resolve.Resolved(None, param="cache.preset")
    with pytest.raises(InvalidRequest) as caught:
        _resolved(model, {"preset": "balanced"})
    assert caught.value.param == "cache.preset"


def test_a_method_resolves_through_the_one_conversion_and_a_target_needs_a_calibration(
    flux: ResidentModel,
) -> None:
    cache = {"method": "first_block_cache", "threshold": 0.3}
    assert _resolved(flux, cache) == resolve.Resolved(_config(cache))
    with pytest.raises(InvalidRequest) as caught:
        _resolved(flux, {"target": {"min_psnr": 30}})
    assert caught.value.param == "cache.target"
    # A named policy never reaches the conversion unresolved.
    with pytest.raises(TypeError, match="resolved"):
        _config({"preset": "fast"})


def test_a_policy_written_as_plain_fields_is_the_same_config_as_from_the_wire() -> None:
    fields = {"cache_interval": 3, "taylor_factors_dtype": "float32", "use_lite_mode": True}
    assert policy.engine_config("taylorseer", fields) == _config({"method": "taylorseer", **fields})
    with pytest.raises(InvalidRequest) as caught:
        policy.engine_config("taylorseer", {"no_such_field": 1})
    assert caught.value.param == "cache.no_such_field"


def test_engine_refusal_names_the_field() -> None:
    with pytest.raises(InvalidRequest) as caught:
        _config({"method": "pyramid_attention_broadcast", "cross_attention_timestep_skip_range": [900, 100]})
    assert caught.value.param == "cache.cross_attention_timestep_skip_range"
    assert "900" in caught.value.message


@pytest.mark.parametrize(
    "config",
    [
        None,
        FirstBlockCacheConfig(threshold=0.2),
        TaylorSeerCacheConfig(cache_interval=3, use_lite_mode=True),
        TaylorSeerCacheConfig(cache_interval=4, taylor_factors_dtype=torch.float32),
        PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2),
        FasterCacheConfig(unconditional_batch_skip_range=3),
    ],
)
def test_describe_round_trips(config: CacheConfig | None) -> None:
    described = policy.describe(config)
    assert _config(described) == config


def test_taylor_factors_dtype_is_named_on_the_wire() -> None:
    config = _config({"method": "taylorseer", "taylor_factors_dtype": "float32"})
    assert config.taylor_factors_dtype is torch.float32
    assert _config({"method": "taylorseer"}).taylor_factors_dtype is torch.bfloat16
    assert policy.describe(config)["taylor_factors_dtype"] == "float32"
    with pytest.raises(ValueError, match="taylor_factors_dtype"):
        GenerationRequest.model_validate(
            {"prompt": "p", "cache": {"method": "taylorseer", "taylor_factors_dtype": "int8"}}
        )


# Every timestep range a body can set: a reversed one passes the wire model and only the engine refuses it.
_RANGE_FIELDS = [
    (method, name)
    for method, wire in POLICY_CLASSES.items()
    for name, info in wire.model_fields.items()
    if isinstance(info.default, tuple)
]


@pytest.mark.parametrize(("method", "field"), _RANGE_FIELDS)
def test_each_engine_refusal_names_its_own_field(method: str, field: str) -> None:
    # Several of these names contain others' words (spatial_attention_..., temporal_attention_...),
    # so the field must come from the error, not from a search of its message.
    with pytest.raises(InvalidRequest) as caught:
        _config({"method": method, field: [900, 100]})
    assert caught.value.param == f"cache.{field}"


def test_a_refusal_that_names_no_field_blames_the_whole_policy() -> None:
    message = "spatial_attention_timestep_skip_range is mentioned, but no field was at fault"
    assert policy.param_of(ValueError(message)) == "cache"
    assert policy.param_of(InvalidConfigValue(message, field="threshold")) == "cache.threshold"


def test_a_target_under_adapters_says_it_is_outside_the_calibration(model_cache: Path) -> None:
    shapes = load_model("shapes-flux", cache_dir=model_cache)
    body = GenerationRequest.model_validate({"prompt": "p", "cache": {"target": {"min_psnr": 30}}})
    plain = resolve.resolve(shapes, body.cache, steps=20, guidance_scale=3.0)
    adapted = resolve.resolve(shapes, body.cache, steps=20, guidance_scale=3.0, loras=(("style", 1.0),))
    assert plain.promise is not None and plain.promise["outside_calibration"] is False
    assert adapted.promise is not None and adapted.promise["outside_calibration"] is True
    assert adapted.promise["adapters"] == ["style"] and adapted.config == plain.config
