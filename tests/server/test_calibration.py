"""A model's calibration: the fastest policy meeting a floor, on the nearest calibrated setting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from server.models.calibration import Calibration, Curve, CurvePoint, load_calibration, merged


def _curve(steps: int, guidance: bool, points: list[tuple[str, float, float]]) -> Curve:
    return Curve(
        steps=steps,
        guidance=guidance,
        guidance_scale=3.0 if guidance else 1.0,
        points=tuple(
            CurvePoint({"method": method}, psnr, speedup, psnr - 5, psnr) for method, psnr, speedup in points
        ),
    )


CALIBRATION = Calibration(
    model="m",
    prompts=4,
    curves=(
        _curve(20, True, [("none", math.inf, 1.0), ("a", 41.0, 1.5), ("b", 36.0, 2.2), ("c", 30.0, 3.0)]),
        _curve(20, False, [("none", math.inf, 1.0), ("a", 45.0, 1.4), ("b", 38.0, 2.5)]),
        _curve(50, True, [("none", math.inf, 1.0), ("c", 37.0, 3.6)]),
    ),
    method_values={"mag_cache": {"mag_ratios": (1.0, 0.9)}},
)


@pytest.mark.parametrize(
    ("floor", "steps", "guidance", "method", "exact"),
    [
        (35.0, 20, True, "b", True),
        (40.0, 20, True, "a", True),
        (50.0, 20, True, "none", True),
        (25.0, 20, True, "c", True),
        (35.0, 20, False, "b", True),
        (35.0, 50, True, "c", True),
        # Not calibrated: the nearest step count with the same guidance, and it says so.
        (35.0, 40, True, "c", False),
        (35.0, 24, True, "b", False),
        (35.0, 50, False, "b", False),
    ],
)
def test_the_fastest_point_over_the_floor_on_the_nearest_curve(
    floor: float, steps: int, guidance: bool, method: str, exact: bool
) -> None:
    choice = CALIBRATION.choose(floor, steps, guidance)
    assert choice is not None
    assert (choice.point.policy["method"], choice.exact) == (method, exact)
    assert choice.point.psnr >= floor


def test_the_floor_is_held_to_the_bound_not_the_pooled_mean() -> None:
    # "wide" is faster and over the floor on average, but its spread over prompts leaves it under the
    # floor at 95% confidence: the target runs the slower policy that keeps the floor on other prompts.
    points = (
        CurvePoint({"method": "none"}, math.inf, 1.0, math.inf, math.inf),
        CurvePoint({"method": "wide"}, 36.0, 2.5, 26.0, 34.2),
        CurvePoint({"method": "tight"}, 36.5, 2.1, 33.0, 35.6),
    )
    calibration = Calibration(model="m", prompts=24, curves=(Curve(20, False, 1.0, points),))
    choice = calibration.choose(35.0, 20, False)
    assert choice is not None and choice.point.policy["method"] == "tight"
    choice = calibration.choose(34.0, 20, False)
    assert choice is not None and choice.point.policy["method"] == "wide"


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
    CALIBRATION.save(path)
    loaded = load_calibration(path)
    assert loaded.curves == CALIBRATION.curves
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
