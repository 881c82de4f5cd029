"""FasterCache: its config, where it cannot apply, and the unconditional-pass skipping on real runs."""

from __future__ import annotations

import dataclasses
import functools
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
    our_config,
    reference_config,
    reference_run,
    session_run,
    tiny,
)

Config = ce.FasterCacheConfig
# Windows that hold every timestep of a run, the first included (0..1000 scale, bounds exclusive).
EVERYWHERE = (-1, 1001)


def test_fields_in_the_reference_order() -> None:
    assert field_names(Config) == field_names(diffusers.FasterCacheConfig)


@pytest.mark.parametrize("field", field_names(Config))
def test_default_matches_reference(field: str) -> None:
    assert_default_matches_reference("FasterCacheConfig", field)


_RANGES = (
    "spatial_attention_timestep_skip_range",
    "temporal_attention_timestep_skip_range",
    "low_frequency_weight_update_timestep_range",
    "high_frequency_weight_update_timestep_range",
    "unconditional_batch_timestep_skip_range",
)
_IDENTIFIERS = (
    "spatial_attention_block_identifiers",
    "temporal_attention_block_identifiers",
    "_unconditional_conditional_input_kwargs_identifiers",
)
_CALLBACKS = (
    "attention_weight_callback",
    "low_frequency_weight_callback",
    "high_frequency_weight_callback",
    "current_timestep_callback",
)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("spatial_attention_block_skip_range", v) for v in (0, -2, None, "2", 2.0)],
        *[("temporal_attention_block_skip_range", v) for v in (0, "2")],
        *[("unconditional_batch_skip_range", v) for v in (0, None, True)],
        *[(f, v) for f in _RANGES for v in ((1,), (681, -1), (None, 1), "(-1, 681)")],
        *[
            (f, v)
            for f in ("alpha_low_frequency", "alpha_high_frequency")
            for v in ("1.1", None, float("nan"), float("inf"))
        ],
        *[(f, v) for f in _IDENTIFIERS for v in ("blocks", [1], ["("])],
        *[(f, 1.0) for f in _CALLBACKS],
        *[("tensor_format", v) for v in ("BSC", "bchw", None)],
        *[("is_guidance_distilled", v) for v in (1, "no", None)],
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    assert_invalid(Config, field, value)


def test_config_is_frozen_and_normalised() -> None:
    # Lists are accepted, as the reference takes them, and stored as tuples.
    config = Config(spatial_attention_block_identifiers=["blocks"])  # type: ignore[arg-type]
    assert config.spatial_attention_block_identifiers == ("blocks",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha_low_frequency = 1.0  # type: ignore[misc]


def test_distilled_with_no_attention_to_act_on_is_an_error(rig: RigFactory) -> None:
    r = rig("flux", "distilled")
    config = Config(is_guidance_distilled=True, spatial_attention_block_identifiers=("no_such_block",))
    with pytest.raises(ce.UnsupportedMethodError) as raised:
        r.engine.check(config)
    assert raised.value.method == "faster_cache"
    assert "faster_cache" in str(raised.value) and "FluxTransformer2DModel" in str(raised.value)


def test_with_cfg_and_no_attention_matched_only_the_uncond_pass_is_skipped(rig: RigFactory) -> None:
    r = rig("cogvideox", "batched")
    config = Config(
        spatial_attention_block_identifiers=("no_such_block",),
        unconditional_batch_timestep_skip_range=EVERYWHERE,
        unconditional_batch_skip_range=2,
    )
    assert set(r.engine.plan(config).handlers) == {r.tp.pipe.transformer}
    _, stats = session_run(r.engine, r.tp, config)
    assert stats.attention_reused == 0 and stats.steps_cached > 0


def _record_batch_sizes(transformer: torch.nn.Module) -> list[int]:
    """Batch size of every real execution of the transformer (installed before the engine)."""
    sizes: list[int] = []
    original = transformer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        sizes.append(int(kwargs["hidden_states"].size(0)))
        return original(*args, **kwargs)

    functools.update_wrapper(forward, original)
    transformer.forward = forward
    return sizes


@pytest.mark.parametrize("skip_range", [2, 3])
def test_batched_cfg_runs_the_cond_half_alone_on_skipping_steps(skip_range: int) -> None:
    tp = tiny("cogvideox", "batched")
    sizes = _record_batch_sizes(tp.pipe.transformer)
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        config = Config(
            unconditional_batch_skip_range=skip_range,
            unconditional_batch_timestep_skip_range=EVERYWHERE,
            spatial_attention_timestep_skip_range=EVERYWHERE,
        )
        _, stats = session_run(engine, tp, config)
    finally:
        engine.close()
    expected = [2 if i == 0 or i % skip_range == 0 else 1 for i in range(stats.denoiser_calls)]
    assert sizes == expected
    assert stats.steps_cached == expected.count(1)


@pytest.mark.parametrize(
    ("family", "cfg", "distilled"),
    [
        ("wan", "distilled", True),
        ("flux", "distilled", True),
        # CFG config on a run without CFG (guidance scale 1, batch of one): only attention applies.
        ("cogvideox", "distilled", False),
    ],
)
def test_a_window_holding_the_first_step_computes_it(
    rig: RigFactory, family: str, cfg: str, distilled: bool
) -> None:
    """Nothing is cached before the first call, so it must compute even inside the skip window."""
    r = rig(family, cfg)
    if family == "wan":
        # The reference reads its empty cache there and fails.
        with pytest.raises(TypeError):
            reference_run(
                r.reference,
                reference_config(
                    "faster_cache",
                    r.reference,
                    is_guidance_distilled=distilled,
                    spatial_attention_timestep_skip_range=EVERYWHERE,
                ),
            )
    config = Config(is_guidance_distilled=distilled, spatial_attention_timestep_skip_range=EVERYWHERE)
    output, stats = session_run(r.engine, r.tp, config)
    assert stats.attention_reused > 0
    assert torch.isfinite(output).all()


def test_attention_weight_callback_matches_the_reference(rig: RigFactory) -> None:
    r = rig("cogvideox", "batched")
    ours, stats = session_run(
        r.engine, r.tp, our_config("faster_cache", r.tp, attention_weight_callback=lambda _: 0.3)
    )
    theirs = reference_run(
        r.reference, reference_config("faster_cache", r.reference, attention_weight_callback=lambda _: 0.3)
    )
    default, _ = session_run(r.engine, r.tp, our_config("faster_cache", r.tp))
    assert stats.attention_reused > 0
    assert max_diff(ours, theirs) <= 1e-5
    assert not torch.equal(ours, default)


def test_frequency_weights_match_the_reference(rig: RigFactory) -> None:
    """Windows where both frequency weights scale the recorded deltas, with alphas off their defaults."""
    r = rig("cogvideox", "batched")
    extra = {
        "low_frequency_weight_update_timestep_range": EVERYWHERE,
        "high_frequency_weight_update_timestep_range": EVERYWHERE,
        "alpha_low_frequency": 1.3,
        "alpha_high_frequency": 0.7,
    }
    ours, _ = session_run(r.engine, r.tp, our_config("faster_cache", r.tp, **extra))
    theirs = reference_run(r.reference, reference_config("faster_cache", r.reference, **extra))
    default, _ = session_run(r.engine, r.tp, our_config("faster_cache", r.tp))
    assert max_diff(ours, theirs) <= 1e-5
    assert not torch.equal(ours, default)
