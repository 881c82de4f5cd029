"""Pyramid Attention Broadcast: its config, where it cannot apply, and its broadcast schedule."""

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

Config = ce.PyramidAttentionBroadcastConfig
FULL_WINDOW = (0, 1000)


def test_fields_in_the_reference_order() -> None:
    assert field_names(Config) == field_names(diffusers.PyramidAttentionBroadcastConfig)


@pytest.mark.parametrize("field", field_names(Config))
def test_default_matches_reference(field: str) -> None:
    assert_default_matches_reference("PyramidAttentionBroadcastConfig", field)


_INVALID: list[tuple[str, object]] = [
    *[
        (f"{kind}_attention_block_skip_range", value)
        for kind in ("spatial", "temporal", "cross")
        for value in (0, -1, 1.5, "2", True)
    ],
    *[
        (f"{kind}_attention_timestep_skip_range", value)
        for kind in ("spatial", "temporal", "cross")
        for value in ((100,), (800, 100), ("a", 1), 500, (0, float("nan")))
    ],
    *[
        (f"{kind}_attention_block_identifiers", value)
        for kind in ("spatial", "temporal", "cross")
        for value in ("blocks", [1], ["("], None)
    ],
    ("current_timestep_callback", 5),
]


@pytest.mark.parametrize(("field", "value"), _INVALID)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    assert_invalid(Config, field, value)


def test_config_is_frozen_and_normalised() -> None:
    config = Config(
        spatial_attention_block_identifiers=["blocks"],  # type: ignore[arg-type]
        spatial_attention_timestep_skip_range=[1, 2],  # type: ignore[arg-type]
    )
    assert config.spatial_attention_block_identifiers == ("blocks",)
    assert config.spatial_attention_timestep_skip_range == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.spatial_attention_block_skip_range = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        # Flux has neither temporal blocks nor cross attention (its attention is joint).
        (Config(temporal_attention_block_skip_range=2), "temporal"),
        (Config(cross_attention_block_skip_range=2), "cross"),
        (
            Config(
                spatial_attention_block_skip_range=2, spatial_attention_block_identifiers=("no_such_block",)
            ),
            "identifiers",
        ),
    ],
)
def test_nothing_to_act_on_is_an_error(rig: RigFactory, config: Config, reason: str) -> None:
    r = rig("flux", "distilled")
    with pytest.raises(ce.UnsupportedMethodError) as raised:
        r.engine.check(config)
    assert raised.value.method == "pyramid_attention_broadcast"
    assert "pyramid_attention_broadcast" in str(raised.value) and "FluxTransformer2DModel" in str(
        raised.value
    )


def test_cross_attention_only_on_a_model_with_cross_attention(rig: RigFactory) -> None:
    """Wan's attn2 is cross attention: only those modules broadcast, and the result is the reference's."""
    r = rig("wan", "distilled")
    kwargs: dict[str, Any] = {
        "cross_attention_block_skip_range": 3,
        "cross_attention_timestep_skip_range": FULL_WINDOW,
    }
    config = Config(**kwargs)
    planned = {
        site.name for site in r.engine.layout.attention if site.module in r.engine.plan(config).handlers
    }
    assert planned == {f"blocks.{i}.attn2" for i in range(len(r.engine.layout.blocks))}

    ours, stats = session_run(r.engine, r.tp, config)
    pipe = r.reference.pipe
    theirs = reference_run(
        r.reference,
        diffusers.PyramidAttentionBroadcastConfig(
            **kwargs, current_timestep_callback=lambda: pipe.current_timestep
        ),
    )
    assert stats.attention_reused > 0
    assert max_diff(ours, theirs) <= 1e-5


def test_no_skip_range_falls_back_to_spatial_two_as_the_reference_does(rig: RigFactory) -> None:
    r = rig("cogvideox", "batched")
    ours, stats = session_run(r.engine, r.tp, Config(spatial_attention_timestep_skip_range=FULL_WINDOW))
    explicit, _ = session_run(
        r.engine,
        r.tp,
        Config(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=FULL_WINDOW),
    )
    assert stats.attention_reused > 0
    assert torch.equal(ours, explicit)


@pytest.mark.parametrize("skip_range", [2, 3, 4])
def test_each_module_computes_once_every_skip_range_calls(rig: RigFactory, skip_range: int) -> None:
    """Iterations 0, N, 2N, ... compute; the ones between reuse (the whole run is inside the window)."""
    r = rig("cogvideox", "batched")
    _, stats = session_run(
        r.engine,
        r.tp,
        Config(
            spatial_attention_block_skip_range=skip_range, spatial_attention_timestep_skip_range=FULL_WINDOW
        ),
    )
    calls = stats.denoiser_calls
    per_module = len(range(0, calls, skip_range))
    assert stats.attention_computed == per_module * len(r.engine.layout.attention)


def test_outside_the_timestep_window_nothing_is_reused(rig: RigFactory) -> None:
    r = rig("flux", "distilled")
    # Flux's first timestep is 1000 and it only decreases; a window above it never opens.
    _, stats = session_run(
        r.engine,
        r.tp,
        Config(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(1000, 2000)),
    )
    assert stats.attention_reused == 0
