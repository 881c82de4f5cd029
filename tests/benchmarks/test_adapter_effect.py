"""Smoke test of ``python -m benchmarks.adapter_effect``: it runs end to end on a few prompts, and its
rows hold where they cannot depend on the adapter's skill (the base model draws no outline; the
outlined scenes through the VAE read outlined)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import adapter_effect


@pytest.mark.slow
def test_a_short_run_writes_every_row_and_the_picture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert adapter_effect.main(["-n", "4", "--scales", "1", "--out", str(tmp_path)]) == 0
    rows = {row["label"]: row for row in json.loads((tmp_path / "adapter.json").read_text())}
    assert list(rows) == ["no adapter", "outline at 1", "ceiling: the scenes outlined, through the VAE"]
    assert all(row["images"] == 4 for row in rows.values())
    assert rows["no adapter"]["read_outlined"] == 0.0
    assert rows["ceiling: the scenes outlined, through the VAE"]["read_outlined"] > 0.0
    assert (tmp_path / "adapter.png").stat().st_size > 0
    assert "| outline at 1 | 4 |" in capsys.readouterr().out
