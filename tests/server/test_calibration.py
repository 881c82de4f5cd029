"""A model's calibration: the fastest policy meeting a floor, on the nearest calibrated setting."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from server.models.calibration import (
    TAIL_DB,
    TAIL_MARGIN_DB,
    TAIL_RATE,
    Calibration,
    Curve,
    CurvePoint,
    EstimateFit,
    load_calibration,
    merged,
    tail_psnr,
)

# Three guarded policies, as a target may choose, named by their tolerance.
A, B, C = "0.02", "0.1", "0.3"


def _policy(name: str) -> dict[str, object]:
    if name == "none":
        return {"method": "none"}
    return {"method": "guarded_taylorseer", "step_tolerance": float(name)}


def _name(point: CurvePoint) -> str:
    return "none" if point.policy["method"] == "none" else str(point.policy["step_tolerance"])


def _curve(steps: int, guidance: bool, points: list[tuple[str, float, float]]) -> Curve:
    return Curve(
        steps=steps,
        guidance=guidance,
        guidance_scale=3.0 if guidance else 1.0,
        points=tuple(
            CurvePoint(_policy(name), psnr, speedup, psnr - 5, psnr) for name, psnr, speedup in points
        ),
    )


CALIBRATION = Calibration(
    model="m",
    prompts=4,
    curves=(
        _curve(20, True, [("none", math.inf, 1.0), (A, 41.0, 1.5), (B, 36.0, 2.2), (C, 30.0, 3.0)]),
        _curve(20, False, [("none", math.inf, 1.0), (A, 45.0, 1.4), (B, 38.0, 2.5)]),
        _curve(50, True, [("none", math.inf, 1.0), (C, 37.0, 3.6)]),
    ),
    method_values={"mag_cache": {"mag_ratios": (1.0, 0.9)}},
)


@pytest.mark.parametrize(
    ("floor", "steps", "guidance", "method", "exact"),
    [
        (35.0, 20, True, B, True),
        (40.0, 20, True, A, True),
        (50.0, 20, True, "none", True),
        (25.0, 20, True, C, True),
        (35.0, 20, False, B, True),
        (35.0, 50, True, C, True),
        # Not calibrated: the nearest step count with the same guidance, and it says so.
        (35.0, 40, True, C, False),
        (35.0, 24, True, B, False),
        (35.0, 50, False, B, False),
    ],
)
def test_the_fastest_point_over_the_floor_on_the_nearest_curve(
    floor: float, steps: int, guidance: bool, method: str, exact: bool
) -> None:
    choice = CALIBRATION.choose(floor, steps, guidance)
    assert choice is not None
    assert (_name(choice.point), choice.exact) == (method, exact)
    assert choice.point.psnr >= floor


def test_the_floor_is_held_to_the_bound_not_the_pooled_mean() -> None:
    # "wide" is faster and over the floor on average, but its spread over prompts leaves it under the
    # floor at 95% confidence: the target runs the slower policy that keeps the floor on other prompts.
    points = (
        CurvePoint({"method": "none"}, math.inf, 1.0, math.inf, math.inf),
        CurvePoint(_policy(A), 36.0, 2.5, 31.0, 34.2),
        CurvePoint(_policy(B), 36.5, 2.1, 33.0, 35.6),
    )
    calibration = Calibration(model="m", prompts=24, curves=(Curve(20, False, 1.0, points),))
    choice = calibration.choose(35.0, 20, False)
    assert choice is not None and _name(choice.point) == B
    choice = calibration.choose(34.0, 20, False)
    assert choice is not None and _name(choice.point) == A


def test_the_tail_decides_not_the_mean() -> None:
    # The faster policy's pooled PSNR and bound clear the floor, but one calibration prompt falls
    # further under the floor than a target promises any prompt: the slower one runs.
    floor = 35.0
    lowest_kept = floor - TAIL_DB + TAIL_MARGIN_DB
    points = (
        CurvePoint(_policy(A), 38.0, 2.5, lowest_kept - 0.5, 36.0),
        CurvePoint(_policy(B), 37.0, 2.0, lowest_kept, 35.5),
    )
    curve = Curve(20, False, 1.0, points)
    chosen = curve.fastest(floor)
    assert chosen is not None and _name(chosen) == B


@pytest.mark.parametrize("prompts", [48, 99, 100, 192, 250])
def test_the_tail_lets_through_one_prompt_in_a_hundred(prompts: int) -> None:
    # Below 100 prompts the worst decides; from 100 on, each hundred may hold one prompt under it.
    allowed = int(TAIL_RATE * prompts)
    kept = [40.0] * (prompts - allowed - 1)
    assert tail_psnr([20.0] * allowed + kept + [31.0]) == 31.0
    assert tail_psnr([20.0] * (allowed + 1) + kept) == 20.0
    assert tail_psnr([35.0] * prompts) == 35.0


def test_a_swinging_prompt_in_a_wide_calibration_rules_out_nothing() -> None:
    floor = 35.0
    lowest_kept = floor - TAIL_DB + TAIL_MARGIN_DB
    # The faster policy's worst prompt is far under the floor, but it is one prompt in 192: its tail
    # keeps what the floor promises. The same worst prompt with no tail recorded (an older file, or
    # under 100 prompts) rules it out.
    swinging = CurvePoint(_policy(A), 38.0, 2.5, lowest_kept - 10, 36.0, tail_psnr=lowest_kept + 0.5)
    steady = CurvePoint(_policy(B), 37.0, 2.0, lowest_kept + 1, 35.5, tail_psnr=lowest_kept + 1)
    chosen = Curve(20, False, 1.0, (swinging, steady)).fastest(floor)
    assert chosen is not None and _name(chosen) == A
    unrecorded = dataclasses.replace(swinging, tail_psnr=None)
    chosen = Curve(20, False, 1.0, (unrecorded, steady)).fastest(floor)
    assert chosen is not None and _name(chosen) == B


def test_only_a_guarded_policy_is_chosen() -> None:
    points = (
        CurvePoint({"method": "taylorseer", "cache_interval": 4}, 45.0, 3.0, 44.0, 44.5),
        CurvePoint({"method": "mag_cache"}, 45.0, 2.8, 44.0, 44.5),
        CurvePoint({"method": "dbcache", "residual_diff_threshold": 0.3}, 45.0, 2.6, 44.0, 44.5),
        CurvePoint(_policy(C), 41.0, 2.0, 37.0, 40.0),
    )
    chosen = Curve(20, False, 1.0, points).fastest(35.0)
    assert chosen is not None and _name(chosen) == C


def test_the_estimate_line_maps_both_ways() -> None:
    fit = EstimateFit(intercept=40.0, slope=-10.0, spread=2.0, runs=12)
    assert fit.psnr(1.0) == 40.0 and fit.psnr(0.1) == pytest.approx(50.0)
    assert fit.psnr(0.0) == math.inf
    assert fit.error_at(30.0) == pytest.approx(10.0)
    # A line that does not fall with the estimate bounds nothing.
    assert EstimateFit(intercept=40.0, slope=1.0, spread=2.0, runs=12).error_at(30.0) is None


def test_a_file_written_before_bounds_promises_its_pooled_psnr(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    CALIBRATION.save(path)
    data = json.loads(path.read_text())
    for curve in data["curves"]:
        for point in curve["points"]:
            del point["psnr_bound"]
    path.write_text(json.dumps(data))
    points = [point for curve in load_calibration(path).curves for point in curve.points]
    assert all(point.psnr_bound == point.psnr for point in points)


def test_nothing_calibrated_chooses_nothing() -> None:
    assert Calibration(model="m", prompts=0).choose(35.0, 20, True) is None


def test_a_saved_calibration_reads_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    fitted = Calibration(
        model="m",
        prompts=4,
        curves=(
            *CALIBRATION.curves[:2],
            dataclasses.replace(
                CALIBRATION.curves[2],
                estimate=EstimateFit(41.0, -9.5, 3.1, 20),
                points=tuple(
                    dataclasses.replace(point, tail_psnr=tail)
                    for point, tail in zip(CALIBRATION.curves[2].points, (math.inf, 33.5), strict=True)
                ),
            ),
        ),
        method_values=CALIBRATION.method_values,
    )
    fitted.save(path)
    loaded = load_calibration(path)
    assert loaded.curves == fitted.curves
    assert {k: dict(v) for k, v in loaded.method_values.items()} == {"mag_cache": {"mag_ratios": [1.0, 0.9]}}


def test_a_file_of_another_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"format": 0, "model": "m"}')
    with pytest.raises(ValueError, match="format"):
        load_calibration(path)


def test_a_new_curve_replaces_the_one_of_its_setting() -> None:
    new = _curve(20, True, [("none", math.inf, 1.0)])
    curves = merged(CALIBRATION.curves, new)
    assert len(curves) == 3 and new in curves
    assert sum(1 for curve in curves if (curve.steps, curve.guidance) == (20, True)) == 1
