"""MagCache: its config, parity with diffusers' MagCache on every tiny family, and each departure."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers.hooks import apply_mag_cache
from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK, FLUX_MAG_RATIOS
from diffusers.hooks.mag_cache import MagCacheConfig as ReferenceConfig
from diffusers.models import FluxTransformer2DModel

import cache_engine as ce
from cache_engine.mag_cache import calibrated_ratios
from tests.cache_engine.pipelines import TinyPipeline, run
from tests.cache_engine.support import (
    ALL_CASES,
    STEPS,
    ForwardCounter,
    alone_and_in_lockstep,
    applied_reference_run,
    assert_invalid,
    assert_refused_on_the_model,
    assert_unsupported,
    field_names,
    max_diff,
    our_run,
    session_run,
    single_block_flux,
    tiny,
)

TOLERANCE = 1e-5

# The published Flux curve, resampled to the run's steps: any curve serves to compare two
# implementations, and at this threshold it skips on every family.
SKIPPING: dict[str, Any] = {
    "threshold": 0.5,
    "mag_ratios": tuple(FLUX_MAG_RATIOS.tolist()),
    "num_inference_steps": STEPS,
}


def reference_run(tp: TinyPipeline, config: Any) -> torch.Tensor:
    """``tp`` under diffusers' MagCache."""
    hooks = (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)
    return applied_reference_run(tp, apply_mag_cache, config, hooks)


# -- config ------------------------------------------------------------------------------------------


def test_fields_and_defaults_are_the_references() -> None:
    assert field_names(ce.MagCacheConfig) == field_names(ReferenceConfig)
    # The reference's defaults cannot be built (no mag_ratios), so compare the declared ones.
    theirs = {f.name: f.default for f in dataclasses.fields(ReferenceConfig)}
    assert {f.name: f.default for f in dataclasses.fields(ce.MagCacheConfig)} == theirs


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", -0.1),
        ("threshold", float("nan")),
        ("threshold", "0.1"),
        ("max_skip_steps", -1),
        ("max_skip_steps", 1.5),
        ("retention_ratio", -0.1),
        ("retention_ratio", 1.5),
        ("num_inference_steps", 0),
        ("num_inference_steps", True),
        ("mag_ratios", []),
        ("mag_ratios", "1.0, 1.0"),
        ("mag_ratios", [1.0, float("inf")]),
        ("mag_ratios", [1.0, -0.5]),
        ("mag_ratios", [1.0, None]),
        ("mag_ratios", torch.ones(2, 2)),
        ("calibrate", 1),
    ],
)
def test_invalid_values_name_their_field(field: str, value: object) -> None:
    assert_invalid(ce.MagCacheConfig, field, value)


def test_config_is_frozen_and_keeps_ratios_as_a_tuple() -> None:
    config = ce.MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS)
    assert config.mag_ratios == tuple(FLUX_MAG_RATIOS.tolist())
    assert ce.MagCacheConfig(mag_ratios=[1, 0.5]).mag_ratios == (1.0, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 0.1  # type: ignore[misc]


def test_without_ratios_planning_refuses_naming_the_field() -> None:
    """Departure: the reference refuses the config itself; ours refuses it on a model.

    So that a server can fill in the ratios it holds for the model before it plans the config.
    """
    with pytest.raises(ValueError, match="mag_ratios"):
        ReferenceConfig()
    tp = tiny("flux", "distilled")
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        # Still listed: a request that brings its ratios runs.
        assert_refused_on_the_model(engine, ce.MagCacheConfig(), "mag_ratios", method="mag_cache")
    finally:
        engine.close()


# -- parity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "cfg"), ALL_CASES)
def test_same_output_as_reference(
    uncached: Callable[[str, str | None], torch.Tensor], family: str, cfg: str
) -> None:
    """Every family and CFG mode: the reference keeps its state per cache_context name, as we keep it
    per branch, and SD3 / PixArt (no cache_context) run under one branch in both."""
    output, stats = our_run(tiny(family, cfg), ce.MagCacheConfig(**SKIPPING))
    theirs = reference_run(tiny(family, cfg), ReferenceConfig(**SKIPPING))

    assert stats.blocks_reused > 0 and stats.steps_cached > 0
    assert max_diff(theirs, uncached(family, cfg)) > 1e-4
    assert max_diff(output, theirs) <= TOLERANCE


def test_reference_api_runs_the_same_policy() -> None:
    tp = tiny("flux", "separate")
    session_output, _ = our_run(tp, ce.MagCacheConfig(**SKIPPING))
    transformer = tp.pipe.transformer
    ce.enable_cache(transformer, ce.MagCacheConfig(**SKIPPING))
    try:
        first, second = run(tp), run(tp)
    finally:
        ce.disable_cache(transformer)
    assert torch.equal(first, session_output)
    assert torch.equal(second, session_output)  # the pipeline's end-of-call reset cleared the state


def test_calibration_measures_the_references_ratios(
    capsys: pytest.CaptureFixture[str], uncached: Callable[[str, str | None], torch.Tensor]
) -> None:
    """Calibration computes everything and measures, per branch, the ratios the reference prints."""
    config: dict[str, Any] = {"calibrate": True, "num_inference_steps": STEPS}
    tp = tiny("flux", "separate")
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        with engine.session(ce.MagCacheConfig(**config)) as session:
            output = run(tp)
            measured = calibrated_ratios(session)
    finally:
        engine.close()
    capsys.readouterr()
    tp.pipe.transformer.enable_cache(ReferenceConfig(**config))
    try:
        run(tp)
    finally:
        tp.pipe.transformer.disable_cache()
    printed = [
        ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if line.startswith("[1")
    ]

    assert torch.equal(output, uncached("flux", "separate"))
    assert session.stats.blocks_reused == 0
    # The cond pass ends its last step first.
    assert [list(measured["cond"]), list(measured["uncond"])] == printed
    assert len(measured["cond"]) == STEPS and measured["cond"][0] == 1.0


# -- exact when idle -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "idle",
    [
        {"calibrate": True},
        {**SKIPPING, "max_skip_steps": 0},
        {**SKIPPING, "retention_ratio": 1.0},
    ],
)
@pytest.mark.parametrize(("family", "cfg"), [("flux", "separate"), ("sd3", "batched"), ("wan", "distilled")])
def test_a_config_that_never_skips_is_exact(
    uncached: Callable[[str, str | None], torch.Tensor], family: str, cfg: str, idle: dict[str, Any]
) -> None:
    output, stats = our_run(tiny(family, cfg), ce.MagCacheConfig(**idle))
    assert stats.blocks_reused == 0 and stats.steps_cached == 0
    assert torch.equal(output, uncached(family, cfg))


# -- isolation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "cfg"), [("flux", "separate"), ("cogvideox", "batched")])
def test_interleaved_sessions_keep_their_own_state(family: str, cfg: str) -> None:
    config_a = ce.MagCacheConfig(**SKIPPING)
    config_b = ce.MagCacheConfig(**{**SKIPPING, "threshold": 0.05, "max_skip_steps": 1})
    (alone_a, alone_b), (together_a, together_b) = alone_and_in_lockstep(
        tiny(family, cfg), config_a, config_b
    )
    assert not torch.equal(alone_a, alone_b)
    assert torch.equal(together_a, alone_a)
    assert torch.equal(together_b, alone_b)


def test_state_lasts_one_session_where_the_reference_carries_it_over() -> None:
    """Departure: SD3's transformer has no CacheMixin, so nothing resets the reference's state between
    pipeline calls; a run of more steps than num_inference_steps leaves it mid-count for the next call.
    Each of our sessions starts afresh, and its first run is the reference's first."""
    config: dict[str, Any] = {**SKIPPING, "num_inference_steps": STEPS - 2}
    reference = tiny("sd3", "batched")
    apply_mag_cache(reference.pipe.transformer, ReferenceConfig(**config))
    reference_first, reference_second = run(reference), run(reference)

    tp = tiny("sd3", "batched")
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        first, _ = session_run(engine, tp, ce.MagCacheConfig(**config))
        second, _ = session_run(engine, tp, ce.MagCacheConfig(**config))
    finally:
        engine.close()
    assert max_diff(reference_first, reference_second) > 1e-4
    assert max_diff(first, reference_first) <= TOLERANCE
    assert torch.equal(first, second)


# -- a single block ---------------------------------------------------------------------------------------


def _calls_that_ran_the_block(transformer: FluxTransformer2DModel, counter: ForwardCounter) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 4, generator=generator),
        "encoder_hidden_states": torch.randn(1, 4, 16, generator=generator),
        "pooled_projections": torch.randn(1, 16, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(4, 3),
        "return_dict": False,
    }
    ran = []
    with torch.no_grad():
        for call in range(6):
            before = counter.calls
            transformer(**inputs)
            if counter.calls > before:
                ran.append(call)
    return ran


def test_a_single_block_model_advances_its_step_when_skipped() -> None:
    """Departure: with one block the reference's head hook returns before its tail hook runs, so its
    step counter stalls on skipped steps and the curve is read late. Here a ratio of 2 at step 3 forces
    that step to compute; the reference computes one step later."""
    config: dict[str, Any] = {
        "threshold": 0.5,
        "max_skip_steps": 3,
        "num_inference_steps": 6,
        "mag_ratios": [1.0, 1.0, 1.0, 2.0, 1.0, 1.0],
    }
    transformer = single_block_flux()
    counter = ForwardCounter(transformer.transformer_blocks[0])
    engine = ce.CacheEngine(transformer)
    try:
        with engine.session(ce.MagCacheConfig(**config)) as session:
            ran = _calls_that_ran_the_block(transformer, counter)
    finally:
        engine.close()
    assert ran == [0, 3]
    assert session.stats.blocks_reused == 4

    reference = single_block_flux()
    reference_counter = ForwardCounter(reference.transformer_blocks[0])
    apply_mag_cache(reference, ReferenceConfig(**config))
    assert _calls_that_ran_the_block(reference, reference_counter) == [0, 4]


def test_a_model_without_blocks_is_unsupported() -> None:
    assert_unsupported(torch.nn.Linear(2, 2), ce.MagCacheConfig(**SKIPPING), "mag_cache")
