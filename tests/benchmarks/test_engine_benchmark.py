"""Smoke test of ``python -m benchmarks.engine``: it runs end to end and its table has the right shape.

Timings on a test machine mean nothing, so nothing here asserts on them; the executed fractions are
counts, and those are checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import engine, report
from benchmarks.probes import Counts, Profile


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[report.Report, str]:
    markdown = tmp_path_factory.mktemp("bench") / "table.md"
    result = engine.main(["--quick", "--families", "flux", "--markdown", str(markdown)])
    return result, markdown.read_text()


@pytest.mark.slow
def test_one_row_per_method(quick_run: tuple[report.Report, str]) -> None:
    result, _ = quick_run
    assert [row.family for row in result.families] == ["flux"]
    assert [(row.family, row.method) for row in result.methods] == [
        ("flux", method) for method in engine.METHOD_NAMES
    ]


@pytest.mark.slow
def test_executed_fractions_are_fractions(quick_run: tuple[report.Report, str]) -> None:
    result, _ = quick_run
    for row in result.methods:
        for side in (row.ours, row.theirs):
            if side.error is not None:
                continue
            for fraction in (side.block_fraction, side.attention_fraction):
                assert fraction is not None
                assert 0.0 < fraction <= 1.0, (row.method, fraction)
            assert side.ideal is not None and side.ideal >= 1.0
        # The engine's own counters and the probes under it count the same executions.
        assert row.ours.stats_agree, row.method
    # Every method skips something on this model: attention for PAB, FasterCache and TaylorSeer,
    # blocks for TaylorSeer lite.
    by_method = {row.method: row.ours for row in result.methods}
    for method in ("taylorseer", "pyramid_attention_broadcast", "faster_cache"):
        attention = by_method[method].attention_fraction
        assert attention is not None and attention < 1.0, method
    lite_blocks = by_method["taylorseer_lite"].block_fraction
    assert lite_blocks is not None and lite_blocks < 1.0
    # And blocks for the methods that skip the stack.
    for method in ("mag_cache", "dbcache", "teacache"):
        blocks = by_method[method].block_fraction
        assert blocks is not None and blocks < 1.0, method


@pytest.mark.slow
def test_methods_diffusers_lacks_are_said_so(quick_run: tuple[report.Report, str]) -> None:
    result, _ = quick_run
    notes = {row.method: row.notes for row in result.methods}
    for method in ("dbcache", "teacache"):
        assert "not in diffusers" in notes[method], notes[method]
    for method in ("mag_cache", "first_block_cache"):
        assert "not in diffusers" not in notes[method]


@pytest.mark.slow
def test_markdown_table_has_expected_columns_and_rows(quick_run: tuple[report.Report, str]) -> None:
    _, markdown = quick_run
    tables = _markdown_tables(markdown)
    assert len(tables) == 2
    family_table, method_table = tables
    assert family_table[0] == list(report.FAMILY_COLUMNS)
    assert len(family_table) == 2  # header and flux
    assert method_table[0] == list(report.METHOD_COLUMNS)
    rows = method_table[1:]
    assert [row[:2] for row in rows] == [["flux", method] for method in engine.METHOD_NAMES]
    blocks = report.METHOD_COLUMNS.index("blocks run (ours)")
    attention = report.METHOD_COLUMNS.index("attn run (ours)")
    for row in rows:
        assert len(row) == len(report.METHOD_COLUMNS)
        for cell in (row[blocks], row[attention]):
            assert 0.0 < float(cell) <= 1.0


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    empty = report.Report(
        method_settings=(("first_block_cache", "threshold=0.5"),),
        families=[],
        methods=[],
        dispatch=report.DispatchCost(1.0, 1.1, 1.2, 1.3),
        steps=2,
        repeats=1,
        scale="quick",
        threads=1,
        seconds=0.0,
    )
    path = tmp_path / "plot.png"
    report.plot(empty, path)
    assert path.read_bytes().startswith(b"\x89PNG")


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """Each Markdown table in ``text`` as rows of cells, separator lines dropped."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if set(line.strip()) <= {"|", "-"}:
                continue
            current.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_a_run_that_skips_nothing_needs_all_of_the_time_to_the_last_bit() -> None:
    """The shares and the rest are medians over separate runs: they need not add up to 1, and the
    fraction a run needs must not depend on that."""
    profile = Profile(
        shares={"a": 0.3, "b": 0.6000000000000001}, rest=0.0999, block_share=0.9, attention_share=0.3
    )
    base = Counts(calls={"a": 4, "b": 4}, rows={"a": 8, "b": 8})
    assert profile.ideal_fraction(base, base) == 1.0
    half_of_b = Counts(calls={"a": 4, "b": 2}, rows={"a": 8, "b": 4})
    assert profile.ideal_fraction(base, half_of_b) == pytest.approx(0.7)
