"""A target that holds per request, on the trained shapes model and its shipped calibration: what a
target runs, the guard it gets, and each answer's own estimate of its PSNR."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cache_engine import GuardedTaylorSeerCacheConfig
from server.models.calibration import TAIL_DB, TAIL_MARGIN_DB, TARGET_METHODS
from server.models.registry import ResidentModel, load_model
from server.policy.calibrate import Setting, engine_config, params_for, run_policy
from server.policy.engine_config import method_of
from server.policy.resolve import resolve
from server.protocol import CacheTarget
from shapes.prompts import HELD_OUT
from tests.server.conftest import LiveServer, live_server

SETTINGS = ((20, 3.0), (20, 1.0), (50, 3.0), (50, 1.0))


@pytest.fixture(scope="module")
def shapes(model_cache: Path) -> ResidentModel:
    return load_model("shapes-flux", cache_dir=model_cache)


def _target(floor: float) -> CacheTarget:
    return CacheTarget.model_validate({"target": {"min_psnr": floor}})


@pytest.mark.parametrize(("steps", "guidance_scale"), SETTINGS)
@pytest.mark.parametrize("floor", [30.0, 35.0, 40.0])
def test_a_target_runs_a_guarded_policy(
    shapes: ResidentModel, steps: int, guidance_scale: float, floor: float
) -> None:
    resolved = resolve(shapes, _target(floor), steps, guidance_scale)
    method = method_of(resolved.config)
    assert method in TARGET_METHODS | {"none"}
    if isinstance(resolved.config, GuardedTaylorSeerCacheConfig):
        # The guard: the budget at which the calibration's line puts the request under what the
        # floor promises each prompt.
        fit = resolved.estimate
        assert fit is not None and fit.slope < 0
        budget = fit.error_at(floor - TAIL_DB + TAIL_MARGIN_DB)
        assert budget is not None
        assert resolved.config.error_budget == pytest.approx(budget, rel=1e-3)
        assert (
            resolved.promise is not None and resolved.promise["error_budget"] == resolved.config.error_budget
        )


def test_some_target_of_the_shipped_calibration_runs_guarded(shapes: ResidentModel) -> None:
    methods = {
        method_of(resolve(shapes, _target(floor), steps, scale).config)
        for steps, scale in SETTINGS
        for floor in (30.0, 35.0, 40.0)
    }
    assert "guarded_taylorseer" in methods


def test_the_estimate_tracks_the_measured_psnr_across_prompts(shapes: ResidentModel) -> None:
    """Eight held-out prompts at three tolerances: the answers' estimated PSNR follows the measured one,
    and the line the calibration fitted is not off by more than its own spread on average."""
    setting = Setting(20, 1.0)
    curve = next(c for c in shapes.calibration.curves if (c.steps, c.guidance) == (20, False))
    fit = curve.estimate
    assert fit is not None
    prompts = HELD_OUT[1]
    estimated: list[float] = []
    measured: list[float] = []
    for prompt, seed in list(zip(prompts.prompts(), prompts.seeds(), strict=True))[:8]:
        params = params_for(shapes, setting, prompt, seed)
        reference, _, _ = run_policy(shapes, params, None)
        for tolerance in (0.02, 0.1, 0.5):
            config = engine_config({"method": "guarded_taylorseer", "step_tolerance": tolerance}, {}, 20)
            pixels, _, estimate = run_policy(shapes, params, config)
            mse = float(((pixels - reference) ** 2).mean())
            assert estimate is not None and estimate > 0 and mse > 0
            estimated.append(fit.psnr(estimate))
            measured.append(10 * math.log10(255.0**2 / mse))
    correlation = float(np.corrcoef(estimated, measured)[0, 1])
    assert correlation >= 0.6, correlation
    assert abs(float(np.mean(np.subtract(estimated, measured)))) <= fit.spread


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["shapes-flux"])


def test_an_answer_says_what_its_own_guard_estimated(server: LiveServer) -> None:
    body = {"prompt": "a small red circle at the left on a blue background", "steps": 20, "seed": 3}
    with server.client() as client:
        answer = client.post(
            "/v1/generations", json={**body, "guidance_scale": 1.0, "cache": {"target": {"min_psnr": 35}}}
        )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    policy, stats = result["cache_policy"], result["cache"]
    assert policy["method"] == "guarded_taylorseer", policy
    target = policy["target"]
    assert target["estimated_error"] == pytest.approx(stats["estimated_error"], abs=1e-4)
    assert target["error_budget"] == policy["error_budget"]
    assert isinstance(target["estimated_psnr"], float) and target["estimate_spread_db"] > 0
    assert stats["steps_cached"] > 0


def test_a_method_named_directly_runs_guarded_and_reports_its_estimate(server: LiveServer) -> None:
    body = {"prompt": "large white star bottom green background", "steps": 20, "seed": 5}
    with server.client() as client:
        strict = client.post(
            "/v1/generations",
            json={**body, "cache": {"method": "guarded_taylorseer", "step_tolerance": 0.0}},
        )
        loose = client.post(
            "/v1/generations",
            json={**body, "cache": {"method": "guarded_taylorseer", "step_tolerance": 0.5}},
        )
        refused = client.post(
            "/v1/generations",
            json={**body, "cache": {"method": "guarded_taylorseer", "step_tolerance": -1}},
        )
    assert strict.status_code == loose.status_code == 200, (strict.text, loose.text)
    assert strict.json()["cache"]["steps_cached"] == 0 and strict.json()["cache"]["estimated_error"] == 0.0
    assert loose.json()["cache"]["steps_cached"] > 0 and loose.json()["cache"]["estimated_error"] > 0
    # No target, no promise: the answer carries the engine's estimate alone.
    assert "target" not in loose.json()["cache_policy"]
    assert refused.status_code == 422
    assert refused.json()["error"]["param"] == "cache.step_tolerance"
