"""Smoke test of ``python -m benchmarks.overlap``: both ways of running two copies generate and are timed.

Rates on a test machine mean nothing, so nothing here compares them.
"""

from __future__ import annotations

import pytest

from benchmarks import overlap


@pytest.mark.slow
def test_each_way_of_running_two_copies_is_measured(capsys: pytest.CaptureFixture[str]) -> None:
    rates = overlap.measure(overlap.DEFAULT_MODEL, images=1, steps=2, cfg=1.0)
    assert set(rates) == {"alone", "threads", "processes"}
    assert all(rate > 0 for rate in rates.values())
    assert overlap.main(["--images", "1", "--steps", "2", "--cfg", "1"]) == 0
    assert "two in processes" in capsys.readouterr().out
