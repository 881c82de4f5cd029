"""What the cache engine saves, measured: executed work, speedup, and hook overhead.

``python -m benchmarks.engine`` builds, per family, two identically seeded pipelines: one carries a
:class:`cache_engine.CacheEngine`, the other is driven with diffusers' own hooks
(``transformer.enable_cache``). For each caching method it reports

- the fraction of block and attention executions that actually ran, from ``session.stats`` and,
  independently (and for diffusers' hooks, only), from probes wrapped around the instance forwards
  of the denoiser, its blocks and its attention modules before any caching hook is installed;
- the speedup over the same pipeline with no cache, in CPU time and in wall-clock time: the median
  over the repeats of the ratio of two runs made back to back, all configurations of a family
  interleaved in a fresh random order in each repeat;
- the speedup that executed work allows (the "ideal"): from a timed profile of the uncached run,
  each probed module's exclusive share of the run time, scaled by the fraction of its work that
  still ran; and whether the measured speedup comes within 3% of it;
- the time per step under each method for both implementations, and the idle cost of the engine
  (installed, no session) against the same pipeline without it.

Timings on a shared CPU are noisy: every ratio comes with its range over the repeats. CPU time of
the process (torch on one thread) is the steadier clock there, since it does not count the time other
processes hold the cores; the verdicts use it, and the wall-clock numbers are printed beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from torch import nn

import cache_engine as ce

from . import models

DEFAULT_FAMILIES = ("flux", "cogvideox", "wan")
WITHIN_IDEAL = 0.97  # the measured speedup should reach 97% of what the executed work allows
IDLE_BUDGET = 0.03  # installed hooks with no session may cost at most 3% of a run
SAME_TIME = 0.01  # per-step times closer than this are reported as equal rather than faster or slower

# Block lists of the benchmarked transformers, found here by name rather than through the engine's
# model table, so the probe counts are independent of what the engine thinks a block is.
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")

ProbeKind = Literal["denoiser", "block", "attention"]
Side = Literal["ours", "diffusers"]


# -- the methods at their benchmark configs -----------------------------------------------------------


@dataclass(frozen=True)
class MethodCase:
    """One row of the table: the same settings for the engine and for diffusers."""

    name: str
    settings: str  # as printed in the table's legend
    ours: Callable[[models.FamilySpec], object]
    # Receives the family and a callback returning the pipeline's current timestep, which diffusers'
    # PAB and FasterCache need (the engine reads the timestep from the denoiser's arguments).
    theirs: Callable[[models.FamilySpec, Callable[[], Any]], object]


# Random weights change the first block's residual far more per step than trained weights do, so the
# usual thresholds (0.05-0.2) would never skip anything here.
FBC_THRESHOLD = 0.5
# Wide ranges make PAB and FasterCache act on (nearly) every step rather than on a middle window
# that a ten-step run barely enters. The upper bound stays at 1000, excluding the first step of the
# flow-matching schedules (t = 1000): diffusers' FasterCache on a guidance-distilled model tries to
# extrapolate attention on its very first call when that call is in range, with nothing cached yet,
# and fails; leaving that step out keeps the two implementations comparable.
_ALL_TIMESTEPS = (-1.0, 1000.0)


def _taylorseer(lite: bool) -> dict[str, Any]:
    # fp32 factors: the pipelines run in fp32, and bf16 casts on CPU would dominate the method's cost.
    return {"cache_interval": 3, "taylor_factors_dtype": torch.float32, "use_lite_mode": lite}


def _pab() -> dict[str, Any]:
    return {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": _ALL_TIMESTEPS}


def _faster_cache(family: models.FamilySpec) -> dict[str, Any]:
    return {
        "spatial_attention_timestep_skip_range": _ALL_TIMESTEPS,
        "unconditional_batch_timestep_skip_range": _ALL_TIMESTEPS,
        "tensor_format": family.tensor_format,
        "is_guidance_distilled": family.cfg == "distilled",
    }


METHODS: tuple[MethodCase, ...] = (
    MethodCase(
        "first_block_cache",
        f"threshold={FBC_THRESHOLD}",
        lambda f: ce.FirstBlockCacheConfig(threshold=FBC_THRESHOLD),
        lambda f, t: diffusers.FirstBlockCacheConfig(threshold=FBC_THRESHOLD),
    ),
    MethodCase(
        "taylorseer",
        "cache_interval=3, fp32 factors, other defaults",
        lambda f: ce.TaylorSeerCacheConfig(**_taylorseer(lite=False)),
        lambda f, t: diffusers.TaylorSeerCacheConfig(**_taylorseer(lite=False)),
    ),
    MethodCase(
        "taylorseer_lite",
        "as taylorseer, use_lite_mode=True",
        lambda f: ce.TaylorSeerCacheConfig(**_taylorseer(lite=True)),
        lambda f, t: diffusers.TaylorSeerCacheConfig(**_taylorseer(lite=True)),
    ),
    MethodCase(
        "pyramid_attention_broadcast",
        "spatial_attention_block_skip_range=2, timestep range (-1, 1000)",
        lambda f: ce.PyramidAttentionBroadcastConfig(**_pab()),
        lambda f, t: diffusers.PyramidAttentionBroadcastConfig(**_pab(), current_timestep_callback=t),
    ),
    MethodCase(
        "faster_cache",
        "defaults, attention and uncond-skip timestep ranges (-1, 1000)",
        lambda f: ce.FasterCacheConfig(**_faster_cache(f)),
        lambda f, t: diffusers.FasterCacheConfig(**_faster_cache(f), current_timestep_callback=t),
    ),
)
METHOD_NAMES = tuple(case.name for case in METHODS)


# -- probes: real executions, counted and optionally timed ---------------------------------------------


@dataclass(frozen=True)
class ProbeSite:
    name: str
    kind: ProbeKind
    parent: str | None  # the nearest probed ancestor, for exclusive times


@dataclass(frozen=True)
class Counts:
    """Executions of each probed module during one run, and the batch rows they processed."""

    calls: dict[str, int]
    rows: dict[str, int]


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        hidden = next((arg for arg in args if isinstance(arg, torch.Tensor)), None)
    return int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.dim() else 1


class Probes:
    """Wraps the instance ``forward`` of the denoiser, its blocks and attention modules.

    Installed before any caching hook, so a hook that skips a module never reaches its probe: a probe
    counts real executions only, whoever decided to skip. Counting costs one Python call per module
    call and is installed on every pipeline of a comparison alike; timing (two CPU-clock reads more,
    so that time the process spends descheduled is not charged to a module) is switched on only for
    the profile runs.
    """

    def __init__(self, transformer: nn.Module) -> None:
        self.sites: dict[str, ProbeSite] = {}
        self.calls: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.timing = False
        self._wrap("", "denoiser", None, transformer)
        for list_name in _BLOCK_LISTS:
            container = getattr(transformer, list_name, None)
            if not isinstance(container, nn.ModuleList):
                continue
            for index, block in enumerate(container):
                block_name = f"{list_name}.{index}"
                self._wrap(block_name, "block", "", block)
                for name, module in block.named_modules():
                    if name and isinstance(module, (Attention, AttentionModuleMixin)):
                        attention = block.get_submodule(name)
                        self._wrap(f"{block_name}.{name}", "attention", block_name, attention)

    def names(self, kind: ProbeKind) -> list[str]:
        return [name for name, site in self.sites.items() if site.kind == kind]

    def reset(self) -> None:
        for name in self.sites:
            self.calls[name] = 0
            self.rows[name] = 0
            self.seconds[name] = 0.0

    def counts(self) -> Counts:
        return Counts(dict(self.calls), dict(self.rows))

    def _wrap(self, name: str, kind: ProbeKind, parent: str | None, module: nn.Module) -> None:
        self.sites[name] = ProbeSite(name, kind, parent)
        forward = module.forward
        calls, rows, seconds = self.calls, self.rows, self.seconds

        def probed(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            rows[name] += _batch_rows(args, kwargs)
            if not self.timing:
                return forward(*args, **kwargs)
            start = time.process_time()
            try:
                return forward(*args, **kwargs)
            finally:
                seconds[name] += time.process_time() - start

        # Keep the signature visible: pipelines and hooks inspect ``transformer.forward``.
        functools.update_wrapper(probed, forward)
        module.forward = probed
        self.calls[name] = 0
        self.rows[name] = 0
        self.seconds[name] = 0.0


@dataclass(frozen=True)
class Profile:
    """Where the uncached run spends its time: each probed module's exclusive share of the CPU time."""

    shares: dict[str, float]
    rest: float  # pipeline code outside the denoiser: scheduler, latents, guidance arithmetic
    block_share: float  # blocks inclusive of their attention
    attention_share: float

    def ideal_fraction(self, base: Counts, run: Counts) -> float:
        """The fraction of the uncached time a run needs if skipped work costs nothing at all.

        Work is counted in batch rows, so a call made on half the batch (FasterCache dropping the
        unconditional half) counts as half a call; time is assumed linear in the batch.
        """
        total = self.rest
        for name, share in self.shares.items():
            done = base.rows[name]
            total += share * (run.rows[name] / done if done else 1.0)
        return total


def profile(probes: Probes, runs: Sequence[Callable[[], Sample]]) -> Profile:
    """Time the uncached run with the probes' clocks on; shares (of CPU time) are medians over ``runs``."""
    per_run: list[dict[str, float]] = []
    totals: list[float] = []
    probes.timing = True
    try:
        for run in runs:
            probes.reset()
            totals.append(run().cpu)
            per_run.append(dict(probes.seconds))
    finally:
        probes.timing = False
    sites = probes.sites
    exclusive: dict[str, list[float]] = {name: [] for name in sites}
    inclusive_blocks: list[float] = []
    inclusive_attention: list[float] = []
    rest: list[float] = []
    for seconds, total in zip(per_run, totals, strict=True):
        children: dict[str, float] = dict.fromkeys(sites, 0.0)
        for name, site in sites.items():
            if site.parent is not None:
                children[site.parent] += seconds[name]
        for name in sites:
            exclusive[name].append((seconds[name] - children[name]) / total)
        inclusive_blocks.append(sum(seconds[n] for n, s in sites.items() if s.kind == "block") / total)
        inclusive_attention.append(sum(seconds[n] for n, s in sites.items() if s.kind == "attention") / total)
        rest.append(1.0 - seconds[""] / total)
    return Profile(
        shares={name: statistics.median(values) for name, values in exclusive.items()},
        rest=statistics.median(rest),
        block_share=statistics.median(inclusive_blocks),
        attention_share=statistics.median(inclusive_attention),
    )


# -- one family: two pipelines and their configurations ----------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One timed run: wall-clock seconds, and CPU seconds of this process.

    With one torch thread the two agree on an idle machine; on a shared one, wall time also counts
    the time other processes held the cores, and CPU time does not.
    """

    wall: float
    cpu: float
    repeat: int = -1
    unit: int = -1  # runs made back to back in one repeat share a unit


Clock = Literal["cpu", "wall"]


@dataclass(frozen=True)
class Config:
    """A timed configuration: which pipeline, with which cache."""

    key: str
    side: Side
    method: MethodCase | None = None
    engine_installed: bool = True  # ours only: False times the pipeline with no engine at all


PLAIN = Config("plain", "ours", engine_installed=False)
IDLE = Config("idle", "ours")
REFERENCE_PLAIN = Config("diffusers-plain", "diffusers")


@dataclass
class Outcome:
    """What one configuration did in its first (untimed) run, and its timings afterwards."""

    config: Config
    counts: Counts | None = None
    output: torch.Tensor | None = None
    stats: ce.SessionStats | None = None
    error: str | None = None
    samples: list[Sample] = field(default_factory=list)
    count_mismatch: bool = False

    def times(self, clock: Clock) -> list[float]:
        return [getattr(sample, clock) for sample in self.samples]

    def by_unit(self, clock: Clock) -> dict[tuple[int, int], float]:
        return {(sample.repeat, sample.unit): getattr(sample, clock) for sample in self.samples}


class FamilyBench:
    def __init__(self, family: str, scale: models.ScaleName, steps: int) -> None:
        self.spec = models.FAMILIES[family]
        self.steps = steps
        # Same seed: same weights and arguments. One pipeline for the engine, one for diffusers' hooks,
        # so neither leaves anything on the other's modules.
        self.ours = models.build(family, scale=scale, steps=steps)
        self.theirs = models.build(family, scale=scale, steps=steps)
        self.probes = Probes(self.ours.transformer)
        self.their_probes = Probes(self.theirs.transformer)
        self.engine: ce.CacheEngine | None = None

    def set_engine(self, installed: bool) -> ce.CacheEngine | None:
        """Install or remove the engine; ``close`` leaves the transformer as it was before it."""
        if installed and self.engine is None:
            self.engine = ce.CacheEngine(self.ours.transformer)
        elif not installed and self.engine is not None:
            self.engine.close()
            self.engine = None
        return self.engine

    def _current_timestep(self) -> Any:
        return getattr(self.theirs.pipe, "current_timestep", None)

    def run_plain(self) -> Sample:
        self.set_engine(False)
        return _timed(lambda: _discard(models.run(self.ours)))

    def run(self, config: Config, outcome: Outcome, *, slot: tuple[int, int] | None = None) -> None:
        """Run ``config`` once. Untimed (no ``slot``): record what it did. Timed: record its time
        under ``slot`` (repeat, unit) and check it did the same work."""
        probes = self.probes if config.side == "ours" else self.their_probes
        probes.reset()
        output: torch.Tensor | None = None
        session_stats: ce.SessionStats | None = None

        def generate() -> None:
            nonlocal output, session_stats
            if config.side == "ours":
                if config.method is None:
                    output = models.run(self.ours)
                    return
                assert self.engine is not None
                with self.engine.session(config.method.ours(self.spec)) as session:
                    output = models.run(self.ours)
                session_stats = session.stats
            else:
                output = models.run(self.theirs)

        if config.side == "ours":
            self.set_engine(config.engine_installed)
            sample = _timed(generate)
        else:
            transformer: Any = self.theirs.transformer
            if config.method is not None:
                # Enabled per run, outside the timed region, so every run starts from fresh hook state.
                transformer.enable_cache(config.method.theirs(self.spec, self._current_timestep))
            try:
                sample = _timed(generate)
            finally:
                if config.method is not None and transformer.is_cache_enabled:
                    transformer.disable_cache()
        counts = probes.counts()
        if slot is None:
            outcome.counts, outcome.output, outcome.stats = counts, output, session_stats
        else:
            outcome.samples.append(dataclasses.replace(sample, repeat=slot[0], unit=slot[1]))
            outcome.count_mismatch |= counts != outcome.counts

    def configs(self) -> list[Config]:
        configs = [PLAIN, IDLE, REFERENCE_PLAIN]
        for case in METHODS:
            configs.append(Config(f"ours:{case.name}", "ours", case))
            configs.append(Config(f"diffusers:{case.name}", "diffusers", case))
        return configs


def _discard(_: object) -> None:
    return None


def _spread(values: Sequence[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def _timed(fn: Callable[[], None]) -> Sample:
    # Collect now so that a collection triggered by an earlier run's garbage is not timed here.
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return Sample(time.perf_counter() - wall, time.process_time() - cpu)


def _short_error(error: BaseException) -> str:
    message = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {message[:60]}" if message else type(error).__name__


# -- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    """The median of a ratio of times taken over runs made back to back, with its range.

    Every ratio in the report compares runs from the same unit of a repeat (see ``bench_family``):
    load that other processes add drifts over seconds, so it mostly cancels within a unit, where a
    ratio of two medians taken minutes apart would carry it whole.
    """

    value: float
    low: float
    high: float

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Ratio:
        return cls(statistics.median(ratios), min(ratios), max(ratios))

    @classmethod
    def paired(cls, numerator: Outcome, denominator: Outcome, clock: Clock = "cpu") -> Ratio:
        bottom = denominator.by_unit(clock)
        return cls.of(
            [time / bottom[unit] for unit, time in numerator.by_unit(clock).items() if unit in bottom]
        )


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
    families: list[FamilyRow]
    methods: list[MethodRow]
    dispatch: DispatchCost
    steps: int
    repeats: int
    scale: str
    threads: int
    seconds: float


def _fraction(counts: Counts, base: Counts, names: list[str]) -> float | None:
    total = sum(base.calls[name] for name in names)
    return None if total == 0 else sum(counts.calls[name] for name in names) / total


def _side(
    bench: FamilyBench,
    outcome: Outcome,
    base: Outcome,
    prof: Profile,
    probes: Probes,
) -> SideResult:
    if outcome.error is not None:
        return SideResult(None, None, None, None, None, None, error=outcome.error)
    assert outcome.counts is not None and base.counts is not None
    blocks = _fraction(outcome.counts, base.counts, probes.names("block"))
    attention = _fraction(outcome.counts, base.counts, probes.names("attention"))
    ideal = 1.0 / prof.ideal_fraction(base.counts, outcome.counts)
    timed = bool(outcome.samples)
    speedup = Ratio.paired(base, outcome) if timed else None
    wall_speedup = Ratio.paired(base, outcome, "wall") if timed else None
    ms = 1e3 * statistics.median(outcome.times("cpu")) / bench.steps if timed else None
    stats_agree = True
    stats = outcome.stats
    if stats is not None:
        stats_agree = stats.blocks_computed == sum(
            outcome.counts.calls[name] for name in probes.names("block")
        ) and stats.attention_computed == sum(
            outcome.counts.calls[name] for name in probes.names("attention")
        )
    return SideResult(blocks, attention, ideal, speedup, wall_speedup, ms, stats_agree=stats_agree)


def _method_row(
    bench: FamilyBench, case: MethodCase, outcomes: dict[str, Outcome], prof: Profile
) -> MethodRow:
    ours_outcome = outcomes[f"ours:{case.name}"]
    theirs_outcome = outcomes[f"diffusers:{case.name}"]
    ours = _side(bench, ours_outcome, outcomes[PLAIN.key], prof, bench.probes)
    theirs = _side(bench, theirs_outcome, outcomes[REFERENCE_PLAIN.key], prof, bench.their_probes)
    notes: list[str] = []
    max_abs_diff: float | None = None
    same_work = False
    if theirs.error is not None:
        notes.append(f"diffusers raises {theirs.error}")
    else:
        assert theirs_outcome.output is not None and ours_outcome.output is not None
        base_output = outcomes[REFERENCE_PLAIN.key].output
        assert base_output is not None
        max_abs_diff = float((ours_outcome.output - theirs_outcome.output).abs().max())
        if torch.equal(theirs_outcome.output, base_output):
            theirs = dataclasses.replace(theirs, no_op=True)
            notes.append("diffusers does nothing (output identical to uncached)")
        same_work = theirs_outcome.counts == ours_outcome.counts
        if not same_work and not theirs.no_op:
            notes.append("diffusers runs different work")
        if max_abs_diff == 0.0:
            notes.append("outputs identical")
        else:
            notes.append(f"max |ours - diffusers| {max_abs_diff:.1e}")
    if not ours.stats_agree:
        notes.append("probe counts differ from session.stats")
    if ours_outcome.count_mismatch or theirs_outcome.count_mismatch:
        notes.append("work differed between repeats")
    base_counts = outcomes[PLAIN.key].counts
    if ours_outcome.counts is not None and base_counts is not None and ours.block_fraction == 1.0:
        # Batched CFG with the uncond half dropped: every block ran, but on half the batch some steps.
        blocks = bench.probes.names("block")
        rows = sum(ours_outcome.counts.rows[name] for name in blocks)
        base_rows = sum(base_counts.rows[name] for name in blocks)
        if rows < base_rows:
            notes.append(f"blocks ran {rows / base_rows:.2f} of the batch rows")
    ours_vs_theirs = None
    if theirs.error is None:
        ours_time = ours_outcome.by_unit("cpu")
        theirs_time = theirs_outcome.by_unit("cpu")
        ours_base = outcomes[PLAIN.key].by_unit("cpu")
        theirs_base = outcomes[REFERENCE_PLAIN.key].by_unit("cpu")
        ours_vs_theirs = Ratio.of(
            [
                (ours_time[unit] / ours_base[unit]) / (theirs_time[unit] / theirs_base[unit])
                for unit in ours_time
                if unit in theirs_time and unit in ours_base and unit in theirs_base
            ]
        )
    return MethodRow(
        family=bench.spec.name,
        method=case.name,
        ours=ours,
        theirs=theirs,
        max_abs_diff=max_abs_diff,
        same_work=same_work,
        notes=tuple(notes),
        ours_vs_theirs=ours_vs_theirs,
    )


def bench_family(
    family: str,
    *,
    scale: models.ScaleName,
    steps: int,
    repeats: int,
    rng: random.Random,
    log: Callable[[str], None],
) -> tuple[FamilyRow, list[MethodRow]]:
    bench = FamilyBench(family, scale, steps)
    # Everything alive now (modules, weights, imported libraries) lives to the end: leave it out of
    # the collections made before each timed run, which otherwise take a tenth of a second each.
    gc.collect()
    gc.freeze()
    configs = bench.configs()
    outcomes = {config.key: Outcome(config) for config in configs}

    # First runs: warm every path up once, and record counts, stats and outputs.
    for config in configs:
        outcome = outcomes[config.key]
        try:
            bench.run(config, outcome)
        except Exception as error:
            if config.side == "ours":
                raise
            outcome.error = _short_error(error)
    plain_output, reference_output = outcomes[PLAIN.key].output, outcomes[REFERENCE_PLAIN.key].output
    assert plain_output is not None and reference_output is not None
    if not torch.equal(plain_output, reference_output):
        raise RuntimeError(f"{family}: the two pipelines disagree with no cache; the comparison is void")
    # Every module the engine wraps: the denoiser, its blocks, its attention modules.
    engine = bench.set_engine(True)
    assert engine is not None
    dispatchers = 1 + len(engine.layout.blocks) + len(engine.layout.attention)

    prof = profile(bench.probes, [bench.run_plain] * max(1, min(repeats, 3)))

    # Each repeat runs its units in a fresh random order, and the runs of a unit back to back in a
    # random order. A unit holds what one ratio compares: a method on both sides with both uncached
    # baselines, or the uncached run and the idle engine (twice per repeat: that ratio is the
    # smallest one measured). Load that other processes add drifts over seconds, so it mostly
    # cancels within a unit.
    units: list[list[Config]] = [[PLAIN, IDLE], [PLAIN, IDLE]]
    for case in METHODS:
        unit = [PLAIN, Config(f"ours:{case.name}", "ours", case)]
        if outcomes[f"diffusers:{case.name}"].error is None:
            unit += [REFERENCE_PLAIN, Config(f"diffusers:{case.name}", "diffusers", case)]
        units.append(unit)
    for repeat in range(repeats):
        order = [list(unit) for unit in units]
        rng.shuffle(order)
        for index, unit in enumerate(order):
            rng.shuffle(unit)
            for config in unit:
                bench.run(config, outcomes[config.key], slot=(repeat, index))
        log(f"  {family}: repeat {repeat + 1}/{repeats} done")

    plain, idle = outcomes[PLAIN.key], outcomes[IDLE.key]
    calls = bench.spec.calls_per_step
    family_row = FamilyRow(
        family=family,
        label=bench.spec.label,
        calls_per_step=calls,
        ms_per_step=1e3 * statistics.median(plain.times("cpu")) / steps,
        wall_ms_per_step=1e3 * statistics.median(plain.times("wall")) / steps,
        idle_overhead=Ratio.paired(idle, plain),
        wall_idle_overhead=Ratio.paired(idle, plain, "wall"),
        instance_noise=Ratio.paired(outcomes[REFERENCE_PLAIN.key], plain),
        spread=_spread(plain.times("cpu")),
        wall_spread=_spread(plain.times("wall")),
        block_share=prof.block_share,
        attention_share=prof.attention_share,
        wrapped_calls_per_step=calls * dispatchers,
    )
    rows = [_method_row(bench, case, outcomes, prof) for case in METHODS]
    if bench.engine is not None:
        bench.engine.close()
    return family_row, rows


# -- the dispatcher on its own -----------------------------------------------------------------------


class _Nop(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


class _NopStack(nn.Module):
    """The smallest model the engine accepts: a block list of modules that do nothing."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Nop() for _ in range(depth))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def dispatch_cost(calls: int = 20_000, depth: int = 50) -> DispatchCost:
    """Per-call cost of a block call that does nothing: bare, engine idle, engine in a session, diffusers hook.

    The cost that counts is the difference to ``bare``; multiplied by the wrapped calls per step it
    bounds the engine's idle overhead independently of the noise on whole-pipeline timings.
    """
    from diffusers.hooks import HookRegistry, ModelHook

    x = torch.zeros(1)
    rounds = max(1, calls // depth)

    def per_call(model: nn.Module, session: Callable[[], Any] | None = None) -> float:
        samples = []
        for _ in range(7):
            start = time.perf_counter()
            if session is None:
                for _ in range(rounds):
                    model(x)
            else:
                with session():
                    for _ in range(rounds):
                        model(x)
            samples.append((time.perf_counter() - start) / (rounds * (depth + 1)))
        return 1e6 * min(samples)

    bare = per_call(_NopStack(depth))
    stack = _NopStack(depth)
    engine = ce.CacheEngine(stack)
    try:
        idle = per_call(stack)
        in_session = per_call(stack, lambda: engine.session(None))
    finally:
        engine.close()
    hooked = _NopStack(depth)
    for module in [hooked, *hooked.blocks]:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(ModelHook(), "nop")
    return DispatchCost(bare, idle, in_session, per_call(hooked))


# -- formatting ---------------------------------------------------------------------------------------


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
    legend = "\n".join(f"- `{case.name}`: {case.settings}" for case in METHODS)
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

    colours = dict(zip(METHOD_NAMES, ("C0", "C1", "C2", "C3", "C4"), strict=True))
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


# -- entry point --------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families",
        nargs="+",
        default=list(DEFAULT_FAMILIES),
        help=f"families to run, space or comma separated (from {', '.join(models.FAMILIES)})",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 5)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per run (default 10)")
    parser.add_argument("--quick", action="store_true", help="tiny models, one repeat: a smoke test")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown here")
    parser.add_argument("--plot", type=Path, default=None, help="also save speedup vs executed work (PNG)")
    # One thread by default: on a small machine shared with other work, OpenMP threads spinning on
    # busy cores make multi-threaded timings swing by several times.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    args = parser.parse_args(argv)
    families = [name for item in args.families for name in item.split(",") if name]
    unknown = sorted(set(families) - set(models.FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {sorted(models.FAMILIES)}")
    args.families = families
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.steps is None:
        args.steps = 6 if args.quick else 10
    if args.repeats < 1 or args.steps < 2:
        parser.error("--repeats must be at least 1 and --steps at least 2")
    return args


@contextmanager
def _frozen_heap() -> Iterator[None]:
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> Report:
    args = _parse(argv)
    # diffusers warns on every enable_cache (FasterCache is "experimental", a default weight is used);
    # the table says what each run did.
    diffusers.utils.logging.set_verbosity_error()
    scale: models.ScaleName = "quick" if args.quick else "bench"

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    rng = random.Random(args.seed)
    family_rows: list[FamilyRow] = []
    method_rows: list[MethodRow] = []
    with _torch_threads(args.threads), _frozen_heap():
        for family in args.families:
            log(f"{family}: building and warming up")
            family_row, rows = bench_family(
                family, scale=scale, steps=args.steps, repeats=args.repeats, rng=rng, log=log
            )
            family_rows.append(family_row)
            method_rows.extend(rows)
        dispatch = dispatch_cost(calls=2_000 if args.quick else 20_000)
    report = Report(
        families=family_rows,
        methods=method_rows,
        dispatch=dispatch,
        steps=args.steps,
        repeats=args.repeats,
        scale=scale,
        threads=args.threads,
        seconds=time.perf_counter() - started,
    )
    print(render_text(report))
    if args.markdown is not None:
        args.markdown.write_text(render_markdown(report))
    if args.plot is not None:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
