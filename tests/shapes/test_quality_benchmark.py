"""The quality sweep runs on the shipped model and writes its table, plot and data."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.slow
def test_sweep_writes_docs(tmp_path: Path) -> None:
    assert (
        quality.main(["-n", "1", "--steps", "6", "--cfg", "1", "--preset-cfg", "1", "--out", str(tmp_path)])
        == 0
    )
    assert {p.name for p in tmp_path.iterdir()} == {"quality.md", "quality.png", "quality.json"}
    data = json.loads((tmp_path / "quality.json").read_text())
    methods = {r["method"] for r in data["results"]}
    assert methods == {"none", "FirstBlockCache", "TaylorSeer", "TaylorSeer lite", "PAB", "FasterCache"}
    baseline = next(r for r in data["results"] if r["method"] == "none")
    assert baseline["psnr"] is None and baseline["blocks"] == 1.0  # identical to itself
    lite = [r for r in data["results"] if r["method"] == "TaylorSeer lite"]
    assert all(r["blocks"] < 1.0 for r in lite)
