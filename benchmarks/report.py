"""The benchmark's results, the targets they are judged against, and their tables and plot."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

WITHIN_IDEAL = 0.97  # the measured speedup should reach 97% of what the executed work allows
IDLE_BUDGET = 0.03  # installed hooks with no session may cost at most 3% of a run
SAME_TIME = 0.01  # per-step times closer than this are reported as equal rather than faster or slower


@dataclass(frozen=True)
class Ratio:
    """The median of a ratio of times taken over runs made back to back, with its range.

    Every ratio in the report compares runs from the same unit of a repeat (see
    ``benchmarks.engine.bench_family``):
    load that other processes add drifts over seconds, so it mostly cancels within a unit, where a
    ratio of two medians taken minutes apart would carry it whole.
    """

    value: float
    low: float
    high: float

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Ratio:
        return cls(statistics.median(ratios), min(ratios), max(ratios))


@dataclass(frozen=True)
class SideResult:
    """One implementation of one method on one family."""

    block_fraction: float | None
    attention_fraction: float | None
    ideal: float | None
    speedup: Ratio | None  # CPU time
    wall_speedup: Ratio | None
    ms_per_step: float | None  # CPU time
    error: str | None = None
    no_op: bool = False
    stats_agree: bool = True  # ours only: probe counts equal session.stats


@dataclass(frozen=True)
class MethodRow:
    family: str
    method: str
    ours: SideResult
    theirs: SideResult
    max_abs_diff: float | None  # ours against diffusers' output
    same_work: bool
    notes: tuple[str, ...]
    # Our time per step over diffusers' at the same config, each relative to its own pipeline's
    # uncached run in the same unit (below 1: ours is faster). Relative, because two identically
    # built pipelines differ by a few percent on their own ("other instance" in the family table).
    ours_vs_theirs: Ratio | None = None

    @property
    def ours_within_ideal(self) -> bool | None:
        if self.ours.speedup is None or self.ours.ideal is None:
            return None
        return self.ours.speedup.value >= WITHIN_IDEAL * self.ours.ideal


@dataclass(frozen=True)
class FamilyRow:
    family: str
    label: str
    calls_per_step: int
    ms_per_step: float  # CPU time
    wall_ms_per_step: float
    idle_overhead: Ratio  # CPU time with the engine installed and no session over none; 1.0 is free
    wall_idle_overhead: Ratio
    instance_noise: Ratio  # CPU time of the diffusers pipeline's plain run over ours: same work
    spread: float  # (max - min) / median of the plain runs' CPU times
    wall_spread: float
    block_share: float
    attention_share: float
    wrapped_calls_per_step: int


@dataclass(frozen=True)
class DispatchCost:
    """Microseconds per call of a do-nothing module: bare, through our dispatcher, through diffusers'."""

    bare_us: float
    engine_idle_us: float
    engine_session_us: float
    diffusers_hook_us: float


@dataclass(frozen=True)
class Report:
    method_settings: tuple[tuple[str, str], ...]  # (method, settings), in row order
    families: list[FamilyRow]
    methods: list[MethodRow]
    dispatch: DispatchCost
    steps: int
    repeats: int
    scale: str
    threads: int
    seconds: float


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(ratio: Ratio | None) -> str:
    return "-" if ratio is None else f"{ratio.value:.2f} ({ratio.low:.2f}-{ratio.high:.2f})"


def _pct(ratio: Ratio) -> str:
    return f"{100 * (ratio.value - 1):+.1f}% ({100 * (ratio.low - 1):+.1f} to {100 * (ratio.high - 1):+.1f})"


FAMILY_COLUMNS = (
    "family",
    "ms/step cpu",
    "ms/step wall",
    "idle engine overhead cpu",
    "idle engine overhead wall",
    "other instance, same work (cpu)",
    "spread cpu",
    "spread wall",
    "time in blocks",
    "time in attention",
)

METHOD_COLUMNS = (
    "family",
    "method",
    "blocks run (ours)",
    "attn run (ours)",
    "blocks run (diffusers)",
    "attn run (diffusers)",
    "ideal (ours)",
    "speedup cpu (ours)",
    "speedup wall (ours)",
    "within 3% of ideal (cpu)",
    "ideal (diffusers)",
    "speedup cpu (diffusers)",
    "speedup wall (diffusers)",
    "ms/step ours",
    "ms/step diffusers",
    "ours/diffusers",
    "notes",
)


def family_cells(row: FamilyRow) -> list[str]:
    return [
        row.label,
        _f(row.ms_per_step, 1),
        _f(row.wall_ms_per_step, 1),
        _pct(row.idle_overhead),
        _pct(row.wall_idle_overhead),
        _pct(row.instance_noise),
        f"{100 * row.spread:.1f}%",
        f"{100 * row.wall_spread:.1f}%",
        f"{100 * row.block_share:.0f}%",
        f"{100 * row.attention_share:.0f}%",
    ]


def method_cells(row: MethodRow) -> list[str]:
    ours, theirs = row.ours, row.theirs
    within = row.ours_within_ideal
    gap = (
        ""
        if ours.speedup is None or ours.ideal is None
        else f" ({100 * (ours.speedup.value / ours.ideal - 1):+.0f}%)"
    )
    vs = row.ours_vs_theirs

    def their(text: str) -> str:
        return "error" if theirs.error else text

    return [
        row.family,
        row.method,
        _f(ours.block_fraction),
        _f(ours.attention_fraction),
        their(_f(theirs.block_fraction)),
        their(_f(theirs.attention_fraction)),
        _f(ours.ideal),
        _ratio(ours.speedup),
        _ratio(ours.wall_speedup),
        "-" if within is None else ("yes" if within else "no") + gap,
        their(_f(theirs.ideal)),
        their(_ratio(theirs.speedup)),
        their(_ratio(theirs.wall_speedup)),
        _f(ours.ms_per_step, 1),
        their(_f(theirs.ms_per_step, 1)),
        "-" if vs is None else _ratio(vs) + ("" if row.same_work else "*"),
        "; ".join(row.notes),
    ]


def _text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows
    )
    return "\n".join(line.rstrip() for line in lines)


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def _header(report: Report) -> str:
    return (
        f"{report.steps} steps, {report.repeats} repeats, scale {report.scale}, "
        f"{report.threads} torch thread(s), torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs; the benchmark took {report.seconds:.0f} s"
    )


def _dispatch_line(report: Report) -> str:
    d = report.dispatch
    return (
        f"per wrapped call of a do-nothing module: bare {d.bare_us:.2f} us; engine installed, no session "
        f"+{d.engine_idle_us - d.bare_us:.2f} us; engine in a session without a handler "
        f"+{d.engine_session_us - d.bare_us:.2f} us; one diffusers hook +{d.diffusers_hook_us - d.bare_us:.2f} us"
    )


def _idle_estimates(report: Report) -> list[str]:
    extra = report.dispatch.engine_idle_us - report.dispatch.bare_us
    return [
        f"{row.label}: {row.wrapped_calls_per_step} wrapped calls per step x {extra:.2f} us = "
        f"{100 * row.wrapped_calls_per_step * extra / (1e3 * row.ms_per_step):.3f}% of a step"
        for row in report.families
    ]


_NOTES = (
    "Every ratio is the median over the repeats of a ratio of runs made back to back (range in brackets). "
    "Speedups: over the same pipeline with no cache. cpu: CPU time of the process, wall: wall-clock time. "
    "idle engine overhead: time with the engine installed and no session over the same pipeline "
    "without it, two pairs per repeat. "
    "ideal: the speedup the executed work allows if skipped work cost nothing, from a CPU-time profile "
    "of the uncached run. ms/step: CPU time, median. ours/diffusers: our time per step over diffusers', each relative to "
    "its own pipeline's uncached run (two identically built pipelines differ by a few percent on their "
    "own); below 1, ours is faster. * marks rows where the two ran "
    "different work, so the times are not like for like."
)


def verdicts(report: Report) -> list[str]:
    """The three targets, each against the numbers of this run (CPU time)."""
    timed = [row for row in report.methods if row.ours_within_ideal is not None]
    missed = [f"{row.family}/{row.method}" for row in timed if not row.ours_within_ideal]
    lines = [
        f"speedup within 3% of what the executed work allows: {len(timed) - len(missed)}/{len(timed)} rows"
        + (f" (missed: {', '.join(missed)})" if missed else "")
    ]
    extra = report.dispatch.engine_idle_us - report.dispatch.bare_us
    idle = []
    for row in report.families:
        predicted = row.wrapped_calls_per_step * extra / (1e3 * row.ms_per_step)
        measured = row.idle_overhead.value - 1
        idle.append(
            f"{row.family} measured {100 * measured:+.1f}% "
            f"({'within' if measured <= IDLE_BUDGET else 'over'} budget), predicted {100 * predicted:.2f}%"
        )
    lines.append(f"idle overhead at most {100 * IDLE_BUDGET:.0f}%: " + "; ".join(idle))
    like = [row for row in report.methods if row.same_work and row.ours_vs_theirs is not None]
    faster = [row for row in like if row.ours_vs_theirs and row.ours_vs_theirs.value < 1 - SAME_TIME]
    slower = [row for row in like if row.ours_vs_theirs and row.ours_vs_theirs.value > 1 + SAME_TIME]
    lines.append(
        f"time per step no worse than diffusers' hooks, {len(like)} like-for-like rows: ours faster by more "
        f"than {100 * SAME_TIME:.0f}% in {len(faster)}, within {100 * SAME_TIME:.0f}% in "
        f"{len(like) - len(faster) - len(slower)}, slower by more in {len(slower)}"
        + (
            ": " + ", ".join(f"{r.family}/{r.method} {_ratio(r.ours_vs_theirs)}" for r in slower)
            if slower
            else ""
        )
    )
    return lines


def render_text(report: Report) -> str:
    parts = [
        _header(report),
        "",
        _text_table(FAMILY_COLUMNS, [family_cells(row) for row in report.families]),
        "",
        _text_table(METHOD_COLUMNS, [method_cells(row) for row in report.methods]),
        "",
        _dispatch_line(report),
        "idle cost this predicts: " + "; ".join(_idle_estimates(report)),
        _NOTES,
        "",
        *verdicts(report),
    ]
    return "\n".join(parts)


def render_markdown(report: Report) -> str:
    legend = "\n".join(f"- `{method}`: {settings}" for method, settings in report.method_settings)
    return "\n".join(
        [
            f"Run: {_header(report)}.",
            "",
            _markdown_table(FAMILY_COLUMNS, [family_cells(row) for row in report.families]),
            "",
            _markdown_table(METHOD_COLUMNS, [method_cells(row) for row in report.methods]),
            "",
            _NOTES,
            "",
            "Targets, against this run's CPU times:",
            "",
            *(f"- {line}" for line in verdicts(report)),
            "",
            "Method settings, identical for both implementations:",
            "",
            legend,
            "",
            f"Dispatcher cost, {_dispatch_line(report)}. Idle cost this predicts: "
            + "; ".join(_idle_estimates(report))
            + ".",
            "",
        ]
    )


def plot(report: Report, path: Path) -> None:
    """Measured speedup against the fraction of the uncached time the executed work needs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {method: f"C{index}" for index, (method, _) in enumerate(report.method_settings)}
    markers = dict(zip([row.family for row in report.families], "osD^v", strict=False))
    figure, axes = plt.subplots(figsize=(7.5, 5))
    xs = [i / 100 for i in range(25, 101)]
    axes.plot(xs, [1 / x for x in xs], color="grey", linestyle="--", label="ideal: 1 / executed fraction")
    axes.fill_between(
        xs, [WITHIN_IDEAL / x for x in xs], [1 / x for x in xs], color="grey", alpha=0.15, label="within 3%"
    )
    for row in report.methods:
        for side, result in (("ours", row.ours), ("diffusers", row.theirs)):
            if result.speedup is None or result.ideal is None or result.no_op:
                continue
            axes.plot(
                1 / result.ideal,
                result.speedup.value,
                marker=markers.get(row.family, "o"),
                color=colours[row.method],
                markerfacecolor=colours[row.method] if side == "ours" else "none",
                linestyle="none",
                markersize=8,
            )
    for method, colour in colours.items():
        axes.plot([], [], color=colour, marker="s", linestyle="none", label=method)
    for family, marker in markers.items():
        axes.plot([], [], color="black", marker=marker, linestyle="none", label=family)
    axes.plot(
        [], [], color="black", marker="o", markerfacecolor="none", linestyle="none", label="diffusers hooks"
    )
    axes.set_xlabel("executed fraction of the uncached run time (from counts x profile)")
    axes.set_ylabel("measured speedup (median CPU time)")
    axes.set_title("Speedup against executed work (filled: cache_engine, hollow: diffusers)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
