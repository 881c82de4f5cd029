"""The held-out check of quality targets, run small: one setting, one set, three prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import held_out, quality
from server.models.calibration import TAIL_DB


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("targets")
    model_cache = tmp_path_factory.mktemp("cache")
    argv = ["--steps", "20", "--cfg", "1", "--sets", "1", "--prompts", "3", "--out", str(out)]
    assert quality.main([*argv, "--cache-dir", str(model_cache)]) == 0
    return out


def test_every_target_and_panel_policy_ran_on_every_prompt(written: Path) -> None:
    data = json.loads((written / "targets.json").read_text())
    runs = data["results"]["20 steps, no CFG"]["A: captions"]
    keys = {run["key"] for run in runs}
    assert {held_out.target_key(floor) for floor in held_out.FLOORS} <= keys
    assert len(keys) == len(held_out.FLOORS) + len(held_out.panel())
    assert all(sum(run["key"] == key for run in runs) == 3 for key in keys)
    # Each target ran what the server would run: a policy that follows the request, or none.
    for run in runs:
        if run["key"].startswith("target"):
            assert run["policy"]["method"] in {
                "none",
                "guarded_taylorseer",
                "first_block_cache",
                "dbcache",
                "teacache",
                "sea_cache",
            }


def test_a_check_is_met_only_within_both_floors(written: Path) -> None:
    _, results = held_out.read(written / "targets.json")
    for check in held_out.checks(results):
        target = check.target
        expected = (
            target.psnr >= check.floor - held_out.POOLED_TOLERANCE_DB
            and target.worst >= check.floor - TAIL_DB
        )
        assert check.quality_met is expected
        if check.best is not None:
            assert held_out.meets(check.best, check.floor)


def test_the_report_and_plot_are_written(written: Path) -> None:
    text = (written / "targets.md").read_text()
    assert "Quality met:" in text and "| 20 steps, no CFG | A: captions | 35 dB |" in text
    assert (written / "targets.png").stat().st_size > 10_000
