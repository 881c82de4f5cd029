"""Smoke test of ``python -m benchmarks.load --quick``: it runs end to end, every answer is the
serial reference's, and nothing failed. Timings on a test machine mean nothing; none is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import load, served


@pytest.mark.slow
def test_quick_load_run_has_no_errors_and_no_mismatches(tmp_path: Path) -> None:
    model_cache = tmp_path / "models"
    report = load.run(["--quick", "--cache-dir", str(model_cache), "--queue-size", "1", "--levels", "1,3"])
    assert [level.concurrency for level in report.levels] == [1, 3]
    assert not any(level.skipped for level in report.levels)
    for level in report.levels:
        # Every request was answered: 200s, or 429s still refused after the retries.
        assert level.sent == 6 and level.ok + level.errors <= level.sent
        assert level.ok > 0
    assert (report.errors, report.mismatches) == (0, 0)
    table = report.markdown()
    assert table.count("\n") == 1 + len(report.levels)


def test_the_mix_is_deterministic_and_covers_policies_and_models() -> None:
    bodies = load.mix(quick=False)
    assert all("seed" in body for body in bodies)
    assert {body["model"] for body in bodies} == {"tiny-flux", "tiny-wan"}
    policies = {str(body.get("cache")) for body in bodies}
    assert len(policies) == len(served.POLICIES)
    assert load.mix(quick=False) == bodies


@pytest.mark.slow
def test_replicas_run_measures_both_servers_against_one_reference(tmp_path: Path) -> None:
    report = load.run(
        ["--quick", "--models", "tiny-flux", "--replicas", "2", "--levels", "2", "--cache-dir", str(tmp_path)]
    )
    assert report.replicas == 2 and report.baseline is not None
    assert [level.concurrency for level in report.baseline] == [level.concurrency for level in report.levels]
    assert all(level.ok > 0 for level in [*report.baseline, *report.levels])
    assert (report.errors, report.mismatches) == (0, 0)
    assert len(report.ratios()) == 1 and report.ratios()[0] > 0
    assert "2 replicas over 1" in report.markdown()


@pytest.mark.slow
def test_max_batch_run_checks_merged_answers_against_one_at_a_time(tmp_path: Path) -> None:
    report = load.run_merged(
        [
            "--quick",
            "--cache-dir",
            str(tmp_path / "models"),
            "--max-batch",
            "1,3",
            "--levels",
            "1,3",
            "--rounds",
            "1",
        ]
    )
    assert [server.max_batch for server in report.served] == [1, 3]
    assert (report.errors, report.mismatches) == (0, 0)
    for server in report.served:
        assert all(level.ok == level.sent == 6 for levels in server.rounds.values() for level in levels)
    # The one-at-a-time server says nothing merged; the other says how its forwards ran.
    assert report.served[0].batch_means == {}
    assert all(mean >= 1 for means in report.served[1].batch_means.values() for mean in means)
    assert report.markdown().count("\n") == 1 + 2 * 2
