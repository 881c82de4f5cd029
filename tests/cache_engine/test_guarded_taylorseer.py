"""Guarded TaylorSeer: its config, its schedule, its budget and its estimate, on real runs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch

import cache_engine as ce
from tests.cache_engine.pipelines import run
from tests.cache_engine.support import Rig, RigFactory, assert_invalid, max_diff, rigs, session_run

Config = ce.GuardedTaylorSeerCacheConfig
STEPS = 12


@pytest.fixture(scope="module")
def long_rig() -> Iterator[RigFactory]:
    # Enough steps after the warm-up for runs of predictions and the checks between them.
    with rigs(steps=STEPS) as get:
        yield get


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("step_tolerance", v) for v in (-0.1, "0.1", None, math.nan)],
        *[("error_budget", v) for v in (-1.0, "1")],
        *[("max_interval", v) for v in (0, 1.5, None)],
        *[("disable_cache_before_step", v) for v in (-1, 1.5, 2)],
        *[("max_order", v) for v in (-1, 1.0)],
        *[("taylor_factors_dtype", v) for v in ("float32", 4)],
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    assert_invalid(Config, field, value)


def test_the_first_check_needs_a_full_series() -> None:
    # Order 2 needs three full steps for its series and a fourth to check it against.
    with pytest.raises(ce.InvalidConfigValue, match="at least max_order \\+ 2 = 4"):
        Config(max_order=2)
    assert Config(max_order=2, disable_cache_before_step=4).max_order == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().step_tolerance = 1.0  # type: ignore[misc]


def test_zero_tolerance_predicts_nothing_and_matches_the_uncached_run(long_rig: RigFactory) -> None:
    r = long_rig("flux", "distilled")
    with r.engine.session(None):
        uncached = _run(r)
    output, stats = session_run(r.engine, r.tp, Config(step_tolerance=0.0))
    assert stats.steps_cached == 0 and stats.blocks_reused == 0
    assert stats.estimated_error == 0.0
    assert max_diff(output, uncached) == 0.0


def test_a_tolerance_nothing_reaches_predicts_runs_of_max_interval_minus_one(long_rig: RigFactory) -> None:
    r = long_rig("flux", "distilled")
    _, stats = session_run(r.engine, r.tp, Config(step_tolerance=1e9, max_interval=3))
    # Steps 0-2 warm up; then two predicted, one full: full steps 0, 1, 2, 5, 8, 11.
    assert stats.steps_computed == 6
    assert stats.blocks_computed == 6 * len(r.engine.layout.blocks)
    assert stats.estimated_error is not None and stats.estimated_error > 0


def test_the_tolerance_follows_the_request(long_rig: RigFactory) -> None:
    """A smaller tolerance computes at least as many steps and estimates no more error; the estimate
    tracks the output's real distance from the uncached one."""
    r = long_rig("flux", "distilled")
    with r.engine.session(None):
        uncached = _run(r)
    runs = []
    for tolerance in (0.001, 0.01, 0.1, 1e9):
        output, stats = session_run(r.engine, r.tp, Config(step_tolerance=tolerance, max_interval=4))
        assert stats.estimated_error is not None
        runs.append((stats.steps_computed, stats.estimated_error, max_diff(output, uncached)))
    computed, estimates, errors = zip(*runs, strict=True)
    assert list(computed) == sorted(computed, reverse=True) and computed[0] > computed[-1]
    assert list(estimates) == sorted(estimates) and estimates[-1] > estimates[0]
    assert errors[-1] > errors[0]


def test_the_budget_stops_prediction_once_spent(long_rig: RigFactory) -> None:
    r = long_rig("flux", "distilled")
    _, free = session_run(r.engine, r.tp, Config(step_tolerance=1e9, max_interval=3))
    assert free.estimated_error is not None
    _, none_left = session_run(r.engine, r.tp, Config(step_tolerance=1e9, error_budget=0.0))
    assert none_left.steps_cached == 0 and none_left.estimated_error == 0.0
    # Half of what the free run spent: it predicts fewer steps and estimates less error.
    budget = free.estimated_error / 2
    _, bounded = session_run(r.engine, r.tp, Config(step_tolerance=1e9, max_interval=3, error_budget=budget))
    assert 0 < bounded.steps_cached < free.steps_cached
    assert bounded.estimated_error is not None and bounded.estimated_error < free.estimated_error


def test_guidance_passes_share_one_schedule(long_rig: RigFactory) -> None:
    """True CFG as separate calls: every step is predicted or computed in both passes together."""
    r = long_rig("flux", "separate")
    _, stats = session_run(r.engine, r.tp, Config(step_tolerance=1e9, max_interval=3))
    assert stats.denoiser_calls == 2 * STEPS
    # The schedule of one pass, twice: full steps 0, 1, 2, 5, 8, 11 in each.
    assert stats.steps_computed == 2 * 6


def test_two_requests_on_one_engine_keep_their_own_guard(long_rig: RigFactory) -> None:
    r = long_rig("flux", "distilled")
    strict, loose = Config(step_tolerance=0.001), Config(step_tolerance=1e9, max_interval=3)
    alone = [session_run(r.engine, r.tp, config) for config in (strict, loose)]
    with r.engine.session(strict) as outer:
        with r.engine.session(loose) as inner:
            inner_output = _run(r)
        outer_output = _run(r)
    assert max_diff(inner_output, alone[1][0]) == 0.0 and max_diff(outer_output, alone[0][0]) == 0.0
    assert outer.stats.estimated_error == alone[0][1].estimated_error
    assert inner.stats.estimated_error == alone[1][1].estimated_error


def test_other_methods_estimate_nothing(long_rig: RigFactory) -> None:
    r = long_rig("flux", "distilled")
    _, stats = session_run(r.engine, r.tp, ce.TaylorSeerCacheConfig(use_lite_mode=True))
    assert stats.estimated_error is None


def _run(r: Rig) -> torch.Tensor:
    return run(r.tp)
