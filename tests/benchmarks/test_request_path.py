"""Smoke test of ``python -m benchmarks.request_path``: it runs end to end on a tiny model and its
stages add up to ``total``. Timings on a test machine mean nothing; the target is not checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import request_path


@pytest.mark.slow
def test_a_short_run_reports_every_measure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quick = ["--size", "32", "--requests", "3", "--warm-up", "1", "--target-ms", "1e9"]
    status = request_path.main(["--model", "tiny-flux", *quick, "--cache-dir", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    for measure in ("own cost: wall - stages", "app: http - stages", "stage pipeline_overhead"):
        assert out.count(measure) == 2, measure
    off_total = next(line for line in out.splitlines() if "stages off total" in line)
    assert float(off_total.split("|")[2]) < 1.0
