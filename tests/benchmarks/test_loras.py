"""The LoRA cost benchmark, one round: it prints a row for every run it names, each with a ratio."""

from __future__ import annotations

import re

import pytest

from benchmarks import loras


def test_one_round_prints_every_run_with_its_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert loras.main(["-n", "1"]) == 0
    printed = capsys.readouterr().out
    rows = dict(re.findall(r"^\| ([a-z][^|]+?) \| [\d.]+ \| ([\d.]+) \|$", printed, re.MULTILINE))
    assert set(rows) == {
        "no adapter, model holding none",
        "no adapter, another copy holding none",
        "no adapter, model holding two",
        "one adapter, folded",
        "two adapters, folded",
        "one adapter, added",
        "two adapters, added",
    }
    assert float(rows["no adapter, model holding none"]) == 1.0
    assert all(float(ratio) > 0 for ratio in rows.values())
    assert "update added to it" in printed
