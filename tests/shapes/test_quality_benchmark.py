"""The quality sweep runs on the shipped model and writes its table, plot and data."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import quality
from server.models.calibration import Calibration, Curve, CurvePoint


def test_ssim_and_psnr_are_sane() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((64, 64, 3))
    assert quality.ssim(image, image) == pytest.approx(1.0)
    assert quality.ssim(image, np.clip(image + 0.2 * rng.standard_normal(image.shape), 0, 1)) < 0.9
    assert quality.psnr(0.0) == float("inf")
    assert quality.psnr(1e-4) == pytest.approx(40.0)


def _result(policy: dict[str, Any], psnr: float, speedup: float, *, steps: int = 20, cfg: float = 3.0) -> Any:
    return quality.Result(
        method=policy["method"],
        knob="-",
        policy=policy,
        steps=steps,
        cfg=cfg,
        blocks=1.0,
        attention=1.0,
        speedup=speedup,
        psnr=psnr,
        psnr_median=psnr,
        psnr_worst=psnr - 3,
        ssim=1.0,
    )


def test_a_target_is_checked_on_the_benchmarks_own_prompts() -> None:
    fast = {"method": "first_block_cache", "threshold": 0.3}
    faithful = {"method": "first_block_cache", "threshold": 0.1}
    results = [
        _result({"method": "none"}, math.inf, 1.0),
        _result(fast, 34.5, 2.0),
        _result(faithful, 41.0, 1.5),
    ]
    # The calibration promised 36 dB for the fast policy; here it gave 34.5 dB.
    curve = Curve(
        20, True, 3.0, (CurvePoint(fast, 36.0, 2.1, 33.0, 35.5), CurvePoint(faithful, 42.0, 1.4, 40.0, 41.0))
    )
    checks = {check.floor: check for check in quality.check_targets(results, Calibration("m", 12, (curve,)))}
    assert checks[35.0].fastest is results[2] and checks[35.0].chosen is results[1]
    assert checks[35.0].kept is True  # within 1 dB of the floor
    assert checks[30.0].fastest is results[1]
    assert checks[40.0].chosen is results[2] and checks[40.0].kept is True
    no_promise = quality.check_targets(
        results,
        Calibration(
            "m", 12, (dataclasses.replace(curve, points=(CurvePoint(fast, 40.0, 2.1, 39.0, 40.0),)),)
        ),
    )
    assert {c.floor: c.kept for c in no_promise}[40.0] is False  # 34.5 dB here against a 40 dB floor


@pytest.mark.slow
def test_sweep_writes_docs(tmp_path: Path) -> None:
    assert quality.main(["-n", "1", "--steps", "6", "--cfg", "1", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"quality.md", "quality.png", "quality.json"}
    data = json.loads((tmp_path / "quality.json").read_text())
    methods = {r["method"] for r in data["results"]}
    # MagCache and TeaCache run on the values fitted in the model's shipped calibration.
    assert methods == {
        "none",
        "FirstBlockCache",
        "TaylorSeer lite",
        "PAB",
        "FasterCache",
        "MagCache",
        "TeaCache",
        "DBCache F1B0 + TaylorSeer",
        "SeaCache",
    }
    baseline = next(r for r in data["results"] if r["method"] == "none")
    assert baseline["psnr"] is None and baseline["blocks"] == 1.0  # identical to itself
    lite = [r for r in data["results"] if r["method"] == "TaylorSeer lite"]
    assert all(r["blocks"] < 1.0 for r in lite)
    assert {(t["steps"], t["floor"]) for t in data["targets"]} == {(6, 30.0), (6, 35.0), (6, 40.0)}


def test_results_read_back_as_written(tmp_path: Path) -> None:
    results = [_result({"method": "none"}, math.inf, 1.0), _result({"method": "teacache"}, 33.0, 2.0)]
    path = tmp_path / "quality.json"
    meta = {"model": "m", "n": 2}
    payload = {"meta": meta, "results": [dataclasses.asdict(r) for r in results]}
    path.write_text(json.dumps(quality._finite(payload)))
    assert quality.read_results(path) == (meta, results)
