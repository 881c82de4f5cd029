"""Wire models: the cache union, strictness, and names that match the engine's configs."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

import pytest
import torch
from pydantic import BaseModel, ValidationError

from cache_engine import CONFIG_CLASSES, SessionStats
from server import protocol
from server.ops.dtypes import dtype_name, dtype_named
from server.protocol import (
    CACHE_METHODS,
    NOT_ON_THE_WIRE,
    POLICY_CLASSES,
    CachePreset,
    CacheStats,
    FirstBlockCache,
    GenerationRequest,
    ImageGenerationRequest,
    NoCache,
    field_path,
)
from server.runtime import job_store


def _errors(body: dict[str, Any], model: type[BaseModel] = GenerationRequest) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return [(field_path(e["loc"], e["type"]), e["type"]) for e in caught.value.errors()]


def test_cache_union_picks_the_class_named_by_method() -> None:
    for method, cls in POLICY_CLASSES.items():
        body = GenerationRequest.model_validate({"prompt": "p", "cache": {"method": method}})
        assert type(body.cache) is cls
    preset = GenerationRequest.model_validate({"prompt": "p", "cache": {"preset": "fast"}})
    assert preset.cache == CachePreset(preset="fast")
    assert GenerationRequest.model_validate({"prompt": "p"}).cache is None


def test_timestep_ranges_are_two_element_lists() -> None:
    body = GenerationRequest.model_validate(
        {
            "prompt": "p",
            "cache": {
                "method": "pyramid_attention_broadcast",
                "spatial_attention_timestep_skip_range": [0, 900],
            },
        }
    )
    assert body.cache is not None
    assert body.cache.spatial_attention_timestep_skip_range == (0, 900)  # type: ignore[union-attr]
    assert _errors(
        {
            "prompt": "p",
            "cache": {"method": "faster_cache", "spatial_attention_timestep_skip_range": [1, 2, 3]},
        }
    ) == [("cache.spatial_attention_timestep_skip_range", "too_long")]


@pytest.mark.parametrize(
    ("cache", "path", "kind"),
    [
        ({"method": "warpcache"}, "cache.method", "unknown_cache_method"),
        ({}, "cache", "cache_selector"),
        ({"method": "none", "preset": "fast"}, "cache", "cache_selector"),
        ({"preset": "fastest"}, "cache.preset", "literal_error"),
        ({"method": "first_block_cache", "threshold": 0.1, "thresh": 1}, "cache.thresh", "extra_forbidden"),
        ({"method": "first_block_cache", "threshold": "0.1"}, "cache.threshold", "float_type"),
        ({"method": "first_block_cache", "threshold": -1}, "cache.threshold", "greater_than_equal"),
        ({"method": "taylorseer", "max_order": 9}, "cache.max_order", "less_than_equal"),
        (
            {"method": "taylorseer", "taylor_factors_dtype": "int8"},
            "cache.taylor_factors_dtype",
            "literal_error",
        ),
        # Not exposed: callbacks and model-structure fields.
        (
            {"method": "pyramid_attention_broadcast", "current_timestep_callback": "x"},
            "cache.current_timestep_callback",
            "extra_forbidden",
        ),
        ({"method": "faster_cache", "tensor_format": "BCHW"}, "cache.tensor_format", "extra_forbidden"),
    ],
)
def test_bad_cache_names_the_field(cache: dict[str, Any], path: str, kind: str) -> None:
    assert _errors({"prompt": "p", "cache": cache}) == [(path, kind)]


def test_requests_are_strict_and_closed() -> None:
    assert _errors({"prompt": "p", "steps": "4"}) == [("steps", "int_type")]
    assert _errors({"prompt": "p", "seed": 1.5}) == [("seed", "int_type")]
    assert _errors({"prompt": "p", "extra": 1}) == [("extra", "extra_forbidden")]
    assert _errors({"prompt": ""}) == [("prompt", "string_too_short")]
    assert _errors({}) == [("prompt", "missing")]


def test_openai_request_rejects_url_with_a_clear_message() -> None:
    with pytest.raises(ValidationError) as caught:
        ImageGenerationRequest.model_validate({"prompt": "p", "response_format": "url"})
    (error,) = caught.value.errors()
    assert error["loc"] == ("response_format",)
    assert "b64_json" in error["msg"] and "url" in error["msg"]


@pytest.mark.parametrize("size", ["64", "64x", "0x64", "64*64", "64x64x1", "-8x8"])
def test_openai_size_must_be_w_x_h(size: str) -> None:
    assert _errors({"prompt": "p", "size": size}, ImageGenerationRequest) == [
        ("size", "string_pattern_mismatch")
    ]


def test_openai_request_converts_to_native() -> None:
    body = ImageGenerationRequest.model_validate(
        {
            "prompt": "p",
            "size": "48x32",
            "n": 2,
            "seed": 3,
            "output_format": "webp",
            "cache": {"preset": "fast"},
        }
    )
    native = body.to_native()
    assert (native.width, native.height, native.n, native.seed, native.output_format) == (
        48,
        32,
        2,
        3,
        "webp",
    )
    assert native.cache == CachePreset(preset="fast")
    auto = ImageGenerationRequest.model_validate({"prompt": "p", "size": "auto"}).to_native()
    assert (auto.width, auto.height) == (None, None)


def test_wire_fields_are_the_engine_config_fields() -> None:
    """Every field a client can set is a parameter of the engine's config, with the same default."""
    assert set(CACHE_METHODS) == {"none", *CONFIG_CLASSES}
    for method, engine_cls in CONFIG_CLASSES.items():
        engine_defaults = {f.name: f.default for f in dataclasses.fields(engine_cls)}
        wire = POLICY_CLASSES[method].model_validate({"method": method})
        for name, value in wire.model_dump(exclude={"method"}).items():
            assert name in engine_defaults, f"{method}.{name} is not an engine parameter"
            expected = engine_defaults[name]
            if isinstance(expected, torch.dtype):
                expected = dtype_name(expected)
            assert value == expected, f"{method}.{name}: default differs from the engine's"


def test_the_wire_takes_each_policy_field_and_its_description_from_the_engine_config() -> None:
    """A field is documented once, on the engine's config: the wire's policy classes have every config
    field a client may set, each described by the config's own words (and what the server adds)."""
    for method, engine_cls in CONFIG_CLASSES.items():
        engine = {field.name: field for field in dataclasses.fields(engine_cls)}
        wire = {
            name: field for name, field in POLICY_CLASSES[method].model_fields.items() if name != "method"
        }
        hidden = NOT_ON_THE_WIRE[method]
        assert not hidden & set(wire), method
        assert set(wire) | hidden == set(engine), f"{method}: a config field neither on the wire nor hidden"
        for name, field in wire.items():
            doc = engine[name].metadata.get("doc")
            assert doc, f"{method}.{name} has no description on the engine config"
            assert field.description is not None, f"{method}.{name}"
            assert field.description == doc or field.description.startswith(f"{doc} ("), f"{method}.{name}"


@pytest.mark.parametrize(
    ("dtype", "name"), [(torch.bfloat16, "bfloat16"), (torch.float16, "float16"), (torch.float32, "float32")]
)
def test_a_dtype_is_named_on_the_wire_without_its_module(dtype: torch.dtype, name: str) -> None:
    assert dtype_name(dtype) == name
    assert dtype_named(name) is dtype


def test_a_stored_job_status_is_a_wire_status() -> None:
    assert get_args(job_store.JobStatus) == get_args(protocol.JobStatus)


def test_cache_stats_carry_every_count_the_engine_keeps() -> None:
    """A response's ``cache`` is the session's stats: a count added to one must be added to the other."""
    assert set(CacheStats.model_fields) == {field.name for field in dataclasses.fields(SessionStats)}


def test_field_path_drops_request_and_union_tags() -> None:
    assert field_path(("body", "cache", "taylorseer", "max_order")) == "cache.max_order"
    assert field_path(("body", "cache", "preset", "preset")) == "cache.preset"
    assert field_path(("body", "prompt")) == "prompt"
    assert field_path(("body", "cache"), "unknown_cache_method") == "cache.method"


def test_models_are_frozen() -> None:
    spec = FirstBlockCache(method="first_block_cache")
    with pytest.raises(ValidationError):
        spec.threshold = 1.0
    assert NoCache(method="none") == NoCache(method="none")
