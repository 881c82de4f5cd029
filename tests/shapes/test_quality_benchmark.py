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


@pytest.mark.slow
def test_sweep_writes_docs(tmp_path: Path) -> None:
    assert quality.main(["--sweep", "-n", "1", "--steps", "6", "--cfg", "1", "--out", str(tmp_path)]) == 0
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
        "Guarded TaylorSeer",
    }
    baseline = next(r for r in data["results"] if r["method"] == "none")
    assert baseline["psnr"] is None and baseline["blocks"] == 1.0  # identical to itself
    lite = [r for r in data["results"] if r["method"] == "TaylorSeer lite"]
    assert all(r["blocks"] < 1.0 for r in lite)


def test_results_read_back_as_written(tmp_path: Path) -> None:
    results = [_result({"method": "none"}, math.inf, 1.0), _result({"method": "teacache"}, 33.0, 2.0)]
    path = tmp_path / "quality.json"
    meta = {"model": "m", "n": 2}
    payload = {"meta": meta, "results": [dataclasses.asdict(r) for r in results]}
    path.write_text(json.dumps(quality.json_safe(payload)))
    assert quality.read_results(path) == (meta, results)
