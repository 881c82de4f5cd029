"""SeaCache: its config, parity with diffusers' SeaCache where it runs (Wan), and the engine running it on
every family, where the reference finds no scheduler position and fails open."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import diffusers
import pytest
import torch
from diffusers.hooks import apply_sea_cache
from diffusers.hooks.sea_cache import (
    _SEA_CACHE_BLOCK_HOOK,
    _SEA_CACHE_LEADER_BLOCK_HOOK,
    _SEA_CACHE_ROOT_HOOK,
    _prepare_wan_t2v_raw_vision_metadata,
)

import cache_engine as ce
from cache_engine.sea_cache import _latents_from_layout
from cache_engine.targets import build_layout
from tests.cache_engine.pipelines import FAMILY_INFO, TinyPipeline
from tests.cache_engine.support import (
    ALL_CASES,
    STEPS,
    alone_and_in_lockstep,
    applied_reference_run,
    assert_default_matches_reference,
    assert_invalid,
    field_names,
    flux2_call,
    max_diff,
    our_run,
    tiny,
    tiny_flux2,
)

TOLERANCE = 1e-5

# Skips whenever the gate may: the budget is never spent, so only the forced steps compute.
ALWAYS: dict[str, Any] = {"threshold": 10.0, "num_inference_steps": STEPS}


def reference_run(tp: TinyPipeline, config: Any) -> torch.Tensor:
    """``tp`` under diffusers' SeaCache."""
    hooks = (_SEA_CACHE_BLOCK_HOOK, _SEA_CACHE_LEADER_BLOCK_HOOK, _SEA_CACHE_ROOT_HOOK)
    return applied_reference_run(tp, apply_sea_cache, config, hooks)


def _engine_config(**kwargs: Any) -> ce.SeaCacheConfig:
    return ce.SeaCacheConfig(**{"num_inference_steps": STEPS, **kwargs})


# -- config ------------------------------------------------------------------------------------------


def test_fields_are_the_references_and_the_step_count() -> None:
    assert field_names(ce.SeaCacheConfig) == [*field_names(diffusers.SeaCacheConfig), "num_inference_steps"]
    assert ce.SeaCacheConfig().num_inference_steps is None


@pytest.mark.parametrize("field", field_names(diffusers.SeaCacheConfig))
def test_default_matches_reference(field: str) -> None:
    assert_default_matches_reference("SeaCacheConfig", field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", -0.1),
        ("threshold", float("inf")),
        ("threshold", None),
        ("residual_order", 2),
        ("residual_order", True),
        ("residual_order", 1.0),
        ("retention_steps", -1),
        ("cache_end_steps", 0.5),
        ("max_consecutive_cached", -1),
        ("max_consecutive_cached", False),
        ("power_exp", 0.0),
        ("power_exp", float("nan")),
        ("raw_vision_callback", "not callable"),
        ("num_inference_steps", 0),
    ],
)
def test_invalid_values_name_their_field(field: str, value: object) -> None:
    assert_invalid(ce.SeaCacheConfig, field, value)


def test_config_is_frozen() -> None:
    config = ce.SeaCacheConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 0.1  # type: ignore[misc]


# -- parity where the reference runs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "overrides"),
    [
        ("distilled", {}),
        ("distilled", {"threshold": 1.0}),
        ("separate", {"threshold": 1.0}),
        ("separate", {"threshold": 1.0, "residual_order": 0}),
        ("separate", {"threshold": 10.0, "max_consecutive_cached": 0, "retention_steps": 2}),
    ],
)
def test_same_output_as_reference_on_wan(
    uncached: Callable[[str, str | None], torch.Tensor], cfg: str, overrides: dict[str, Any]
) -> None:
    """Wan's pipeline passes the scheduler position to cache_context and the reference reads its latents;
    ours counts the steps, reads sigma from the timestep and the step count from the config."""
    output, stats = our_run(tiny("wan", cfg), _engine_config(**overrides))
    theirs = reference_run(tiny("wan", cfg), diffusers.SeaCacheConfig(**overrides))

    assert stats.blocks_reused > 0 and stats.steps_cached > 0
    assert max_diff(theirs, uncached("wan", cfg)) > 1e-4
    assert max_diff(output, theirs) <= TOLERANCE


def test_the_step_count_comes_from_the_config_else_from_the_pipeline() -> None:
    """Wan's pipeline tells its cache_context the step count, and the reference reads it there: a config
    without one reads it there too, so its last step computes and the reference's output comes out."""
    overrides: dict[str, Any] = {"threshold": 10.0, "max_consecutive_cached": 0, "cache_end_steps": 1}
    theirs = reference_run(tiny("wan", "distilled"), diffusers.SeaCacheConfig(**overrides))
    counted, with_count = our_run(tiny("wan", "distilled"), _engine_config(**overrides))
    told, told_count = our_run(tiny("wan", "distilled"), ce.SeaCacheConfig(**overrides))
    assert max_diff(counted, theirs) <= TOLERANCE and max_diff(told, theirs) <= TOLERANCE
    # The first step and the last compute, whichever gave the count.
    assert with_count.steps_cached == told_count.steps_cached == STEPS - 2
    # Flux's pipeline tells its cache_context nothing: without the config's count only the first computes.
    _, flux_counted = our_run(tiny("flux"), _engine_config(**overrides))
    _, flux_uncounted = our_run(tiny("flux"), ce.SeaCacheConfig(**overrides))
    blocks = len(build_layout(tiny("flux").pipe.transformer).blocks)
    assert (flux_counted.steps_cached, flux_uncounted.steps_cached) == (STEPS - 2, STEPS - 1)
    assert flux_uncounted.blocks_reused == flux_counted.blocks_reused + blocks


def test_a_given_latents_callback_is_used() -> None:
    """The reference's own Wan adapter as the callback gives what the family table gives."""
    tp = tiny("wan", "separate")
    from_table, stats = our_run(tp, _engine_config(threshold=1.0))
    calls: list[torch.nn.Module] = []

    def adapter(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        calls.append(module)
        return _prepare_wan_t2v_raw_vision_metadata(module, args, kwargs)

    from_callback, callback_stats = our_run(tp, _engine_config(threshold=1.0, raw_vision_callback=adapter))
    assert torch.equal(from_callback, from_table) and callback_stats == stats
    assert calls and all(module is tp.pipe.transformer for module in calls)

    # No latents: every call runs in full, as in the reference.
    _, none_stats = our_run(tp, _engine_config(threshold=1.0, raw_vision_callback=lambda *_: None))
    assert none_stats.blocks_reused == 0


# -- every family ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "cfg"), ALL_CASES)
def test_runs_on_every_family(
    uncached: Callable[[str, str | None], torch.Tensor], family: str, cfg: str
) -> None:
    output, stats = our_run(tiny(family, cfg), ce.SeaCacheConfig(**ALWAYS))
    blocks = len(build_layout(tiny(family, cfg).pipe.transformer).blocks)
    branches = stats.denoiser_calls // STEPS
    # With two in a row at most, steps 1, 2 and 4 reuse; 0 is retained, 3 forced, 5 the last.
    assert stats.steps_cached == 3 * branches
    assert stats.blocks_reused == 3 * branches * blocks
    assert torch.isfinite(output).all()
    base = uncached(family, cfg)
    assert max_diff(output, base) > 1e-4
    if FAMILY_INFO[family].pipeline_class != "WanPipeline":
        # Departure: the reference finds no scheduler position (or no latents) here and never skips.
        theirs = reference_run(tiny(family, cfg), diffusers.SeaCacheConfig(threshold=10.0))
        assert torch.equal(theirs, base)


@pytest.mark.parametrize(
    ("family", "layout"),
    [("wan", "BCFHW"), ("cogvideox", "BFCHW"), ("sd3", "BCHW"), ("flux", "BSC")],
)
def test_latents_read_through_the_family_layout(family: str, layout: str) -> None:
    transformer = tiny(family).pipe.transformer
    table = build_layout(transformer)
    assert table.family.output_format == layout
    shape = {"BCFHW": (2, 4, 3, 8, 8), "BFCHW": (2, 3, 4, 8, 8), "BCHW": (2, 4, 16, 16), "BSC": (2, 64, 16)}
    hidden = torch.randn(shape[layout])
    latents = _latents_from_layout(table, (), {"hidden_states": hidden})
    assert latents is not None and len(latents) == 2
    expected = {
        "BCFHW": hidden,
        "BFCHW": hidden.transpose(1, 2),
        "BCHW": hidden.unsqueeze(2),
        "BSC": hidden.transpose(1, 2)[:, :, None, None, :],
    }[layout]
    for latent, want in zip(latents, expected.unbind(0), strict=True):
        assert latent.ndim == 4 and torch.equal(latent, want)
    if family == "wan":
        reference = _prepare_wan_t2v_raw_vision_metadata(transformer, (), {"hidden_states": hidden})
        assert reference is not None
        assert all(torch.equal(a, b) for a, b in zip(latents, reference, strict=True))


def test_image_conditioned_inputs_keep_only_the_noisy_latents() -> None:
    """Wan image-to-video appends the condition's channels after the latents: the indicator leaves them out."""
    table = build_layout(tiny("wan").pipe.transformer)
    config: Any = table.denoiser.config
    channels: int = config.out_channels
    hidden = torch.randn(1, 2 * channels + 1, 3, 8, 8)
    (latent,) = _latents_from_layout(table, (), {"hidden_states": hidden}) or []
    assert torch.equal(latent, hidden[0, :channels])


def test_a_fused_text_and_image_tail_records_its_residual() -> None:
    """Departure: Flux2's single-stream blocks return the joined text+image sequence, whose shape is not the
    leader's input; the reference records nothing there and never skips. Ours takes the image tokens, so
    a repeated call is served from the residual and lands where the full call did."""
    transformer = tiny_flux2()
    config = ce.SeaCacheConfig(residual_order=0, cache_end_steps=0, num_inference_steps=2)
    engine = ce.CacheEngine(transformer)
    try:
        with engine.session(config) as session:
            full, served = flux2_call(transformer, 16), flux2_call(transformer, 16)
    finally:
        engine.close()
    assert session.stats.blocks_reused == len(engine.layout.blocks)
    assert torch.allclose(served, full, atol=1e-5)


# -- exact when idle, and isolation ------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "cfg"), [("flux", "separate"), ("wan", "separate"), ("sd3", "batched")])
def test_threshold_zero_is_exact(
    uncached: Callable[[str, str | None], torch.Tensor], family: str, cfg: str
) -> None:
    output, stats = our_run(tiny(family, cfg), _engine_config(threshold=0.0))
    assert stats.blocks_reused == 0 and stats.steps_cached == 0
    assert torch.equal(output, uncached(family, cfg))


@pytest.mark.parametrize(("family", "cfg"), [("wan", "separate"), ("ltx", "batched")])
def test_interleaved_sessions_keep_their_own_state(family: str, cfg: str) -> None:
    config_a = ce.SeaCacheConfig(**ALWAYS)
    config_b = _engine_config(threshold=10.0, residual_order=0, max_consecutive_cached=1)
    (alone_a, alone_b), (together_a, together_b) = alone_and_in_lockstep(
        tiny(family, cfg), config_a, config_b
    )
    assert not torch.equal(alone_a, alone_b)
    assert torch.equal(together_a, alone_a)
    assert torch.equal(together_b, alone_b)
