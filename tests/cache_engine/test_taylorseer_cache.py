"""TaylorSeer: its config, where it cannot apply, and which steps compute, counted on real runs."""

from __future__ import annotations

import dataclasses
from typing import Any

import diffusers
import pytest
import torch

import cache_engine as ce
from tests.cache_engine.support import (
    RigFactory,
    assert_default_matches_reference,
    assert_invalid,
    field_names,
    max_diff,
    reference_run,
    session_run,
)

Config = ce.TaylorSeerCacheConfig


def test_fields_in_the_reference_order() -> None:
    assert field_names(Config) == field_names(diffusers.TaylorSeerCacheConfig)


@pytest.mark.parametrize("field", field_names(Config))
def test_default_matches_reference(field: str) -> None:
    assert_default_matches_reference("TaylorSeerCacheConfig", field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("cache_interval", v) for v in (0, -1, 1.5, "5", True, None)],
        *[("disable_cache_before_step", v) for v in (-1, 1.5, None)],
        *[("disable_cache_after_step", v) for v in (-1, "3")],
        *[("max_order", v) for v in (-1, 1.0, None)],
        *[("taylor_factors_dtype", v) for v in ("float32", torch.float32.itemsize)],
        *[("skip_predict_identifiers", v) for v in ("proj_out", [1], ["("])],
        *[("cache_identifiers", v) for v in ("proj_out", [None], ["[a-"])],
        *[("use_lite_mode", v) for v in (1, "yes", None)],
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    assert_invalid(Config, field, value)


def test_config_is_frozen_and_normalised() -> None:
    # Lists are accepted, as the reference takes them, and stored as tuples.
    config = Config(cache_identifiers=["a", "b"])  # type: ignore[arg-type]
    assert config.cache_identifiers == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache_interval = 2  # type: ignore[misc]


def test_identifiers_matching_nothing_are_an_error(rig: RigFactory) -> None:
    r = rig("flux", "distilled")
    with pytest.raises(ce.UnsupportedMethodError) as raised:
        r.engine.check(Config(cache_identifiers=("no_such_module",)))
    assert raised.value.method == "taylorseer"
    assert "taylorseer" in str(raised.value) and "FluxTransformer2DModel" in str(raised.value)


def _computing_steps(config: Config, steps: int) -> list[int]:
    """The reference's schedule, written out: warm-up steps, then one refresh every cache_interval.

    Step 0 always computes: with no warm-up the reference would have to predict from nothing and
    raises; we compute there instead.
    """
    return [
        step
        for step in range(steps)
        if step == 0
        or step < config.disable_cache_before_step
        or (step - config.disable_cache_before_step - 1) % config.cache_interval == 0
        or (config.disable_cache_after_step is not None and step >= config.disable_cache_after_step)
    ]


@pytest.mark.parametrize(
    "config",
    [
        Config(cache_interval=3, disable_cache_before_step=2),
        Config(cache_interval=2, disable_cache_before_step=0),
        Config(cache_interval=2, disable_cache_before_step=1, disable_cache_after_step=4),
        Config(cache_interval=5, disable_cache_before_step=3),
    ],
    ids=["interval3", "interval2-no-warmup", "stop-after-4", "defaults"],
)
def test_attention_computes_on_the_schedule(rig: RigFactory, config: Config) -> None:
    r = rig("flux", "distilled")
    _, stats = session_run(r.engine, r.tp, config)
    steps = stats.denoiser_calls
    # The default patterns cover every attention module of Flux's two block lists.
    assert stats.attention_computed == len(_computing_steps(config, steps)) * len(r.engine.layout.attention)
    assert stats.blocks_reused == 0


def test_lite_mode_skips_blocks_and_caches_the_output_projection(rig: RigFactory) -> None:
    r = rig("wan", "distilled")
    config = Config(
        cache_interval=2, disable_cache_before_step=1, use_lite_mode=True, cache_identifiers=("x",)
    )
    handlers = r.engine.plan(config).handlers
    transformer = r.tp.pipe.transformer
    # Lite mode overrides the identifiers given, as the reference's does.
    assert transformer.proj_out in handlers
    assert all(site.module in handlers for site in r.engine.layout.blocks)
    _, stats = session_run(r.engine, r.tp, config)
    assert stats.blocks_computed == len(_computing_steps(config, stats.denoiser_calls)) * len(
        r.engine.layout.blocks
    )


def test_branches_keep_their_own_factors(rig: RigFactory) -> None:
    """With separate cond/uncond calls each branch steps its own counter: both compute their warm-up."""
    r = rig("wan", "separate")
    config = Config(cache_interval=3, disable_cache_before_step=2)
    _, stats = session_run(r.engine, r.tp, config)
    steps = stats.denoiser_calls // 2
    attention = len(r.engine.plan(config).handlers)
    assert stats.attention_computed == 2 * len(_computing_steps(config, steps)) * attention + (
        # Cross attention (attn2) is hooked too by the fallback; everything else always computes.
        stats.denoiser_calls * (len(r.engine.layout.attention) - attention)
    )


def test_higher_order_matches_the_reference(rig: RigFactory) -> None:
    r = rig("flux", "distilled")
    kwargs: dict[str, Any] = {
        "cache_interval": 2,
        "disable_cache_before_step": 2,
        "max_order": 2,
        "taylor_factors_dtype": torch.float32,
    }
    ours, stats = session_run(r.engine, r.tp, Config(**kwargs))
    theirs = reference_run(r.reference, diffusers.TaylorSeerCacheConfig(**kwargs))
    assert stats.attention_reused > 0
    assert max_diff(ours, theirs) <= 1e-5


def test_bfloat16_factors_match_the_reference(rig: RigFactory) -> None:
    r = rig("flux", "distilled")
    ours, _ = session_run(r.engine, r.tp, Config(cache_interval=2, disable_cache_before_step=2))
    theirs = reference_run(
        r.reference, diffusers.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2)
    )
    assert max_diff(ours, theirs) <= 1e-5


def test_no_warm_up_computes_the_first_step_where_the_reference_raises(rig: RigFactory) -> None:
    r = rig("flux", "distilled")
    kwargs: dict[str, Any] = {"cache_interval": 2, "disable_cache_before_step": 0}
    with pytest.raises(ValueError, match="Cannot predict"):
        reference_run(r.reference, diffusers.TaylorSeerCacheConfig(**kwargs))
    output, stats = session_run(r.engine, r.tp, Config(**kwargs))
    assert stats.attention_reused > 0
    assert torch.isfinite(output).all()
