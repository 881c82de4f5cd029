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
from torch import nn

import cache_engine as ce

from . import compiled, models
from .probes import Counts, Probes, Profile, profile
from .report import (
    DispatchCost,
    FamilyRow,
    MethodRow,
    Ratio,
    Report,
    SideResult,
    render_markdown,
    render_text,
)
from .report import plot as plot_report

DEFAULT_FAMILIES = ("flux", "cogvideox", "wan")

Side = Literal["ours", "diffusers"]


# -- the methods at their benchmark configs -----------------------------------------------------------


@dataclass(frozen=True)
class MethodCase:
    """One row of the table: the same settings for the engine and for diffusers."""

    name: str
    settings: str  # as printed in the table's legend
    # Receives the family and the run's step count.
    ours: Callable[[models.FamilySpec, int], object]
    # Receives the family, a callback returning the pipeline's current timestep, which diffusers'
    # PAB and FasterCache need (the engine reads the timestep from the denoiser's arguments), and the
    # run's step count. Raises NotInDiffusers for a method diffusers does not ship.
    theirs: Callable[[models.FamilySpec, Callable[[], Any], int], object]


class NotInDiffusers(Exception):
    """The method has no implementation in diffusers to compare with."""


def _not_in_diffusers(
    name: str, reference: str
) -> Callable[[models.FamilySpec, Callable[[], Any], int], object]:
    def refuse(family: models.FamilySpec, timestep: Callable[[], Any], steps: int) -> object:
        raise NotInDiffusers(f"diffusers has no {name}; {reference}")

    return refuse


# Random weights change the first block's residual far more per step than trained weights do, so the
# usual thresholds (0.05-0.2) would never skip anything here.
FBC_THRESHOLD = 0.5
# Wide ranges make PAB and FasterCache act on (nearly) every step rather than on a middle window
# that a ten-step run barely enters. The upper bound stays at 1000, excluding the first step of the
# flow-matching schedules (t = 1000): diffusers' FasterCache on a guidance-distilled model tries to
# extrapolate attention on its very first call when that call is in range, with nothing cached yet,
# and fails; leaving that step out keeps the two implementations comparable.
_ALL_TIMESTEPS = (-1.0, 1000.0)


# MagCache's ratios are per checkpoint and these weights are random: a flat curve (no change in
# magnitude) makes its error grow only from retention, so both sides skip on the same steps.
MAG_THRESHOLD = 0.06
SEA_THRESHOLD = 0.5
TEA_THRESHOLD = 0.5


def _mag_cache(steps: int) -> dict[str, Any]:
    return {"threshold": MAG_THRESHOLD, "mag_ratios": [1.0] * steps, "num_inference_steps": steps}


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
        lambda f, n: ce.FirstBlockCacheConfig(threshold=FBC_THRESHOLD),
        lambda f, t, n: diffusers.FirstBlockCacheConfig(threshold=FBC_THRESHOLD),
    ),
    MethodCase(
        "taylorseer",
        "cache_interval=3, fp32 factors, other defaults",
        lambda f, n: ce.TaylorSeerCacheConfig(**_taylorseer(lite=False)),
        lambda f, t, n: diffusers.TaylorSeerCacheConfig(**_taylorseer(lite=False)),
    ),
    MethodCase(
        "taylorseer_lite",
        "as taylorseer, use_lite_mode=True",
        lambda f, n: ce.TaylorSeerCacheConfig(**_taylorseer(lite=True)),
        lambda f, t, n: diffusers.TaylorSeerCacheConfig(**_taylorseer(lite=True)),
    ),
    MethodCase(
        "pyramid_attention_broadcast",
        "spatial_attention_block_skip_range=2, timestep range (-1, 1000)",
        lambda f, n: ce.PyramidAttentionBroadcastConfig(**_pab()),
        lambda f, t, n: diffusers.PyramidAttentionBroadcastConfig(**_pab(), current_timestep_callback=t),
    ),
    MethodCase(
        "faster_cache",
        "defaults, attention and uncond-skip timestep ranges (-1, 1000)",
        lambda f, n: ce.FasterCacheConfig(**_faster_cache(f)),
        lambda f, t, n: diffusers.FasterCacheConfig(**_faster_cache(f), current_timestep_callback=t),
    ),
    MethodCase(
        "mag_cache",
        f"threshold={MAG_THRESHOLD}, flat mag_ratios (1.0 per step), other defaults",
        lambda f, n: ce.MagCacheConfig(**_mag_cache(n)),
        lambda f, t, n: diffusers.MagCacheConfig(**_mag_cache(n)),
    ),
    MethodCase(
        "sea_cache",
        f"threshold={SEA_THRESHOLD}, other defaults",
        lambda f, n: ce.SeaCacheConfig(threshold=SEA_THRESHOLD, num_inference_steps=n),
        lambda f, t, n: diffusers.SeaCacheConfig(threshold=SEA_THRESHOLD),
    ),
    MethodCase(
        "dbcache",
        f"F1B0, residual_diff_threshold={FBC_THRESHOLD}, max_warmup_steps=2, TaylorSeer order 1",
        lambda f, n: ce.DBCacheConfig(
            Fn_compute_blocks=1,
            residual_diff_threshold=FBC_THRESHOLD,
            max_warmup_steps=2,
            enable_taylorseer=True,
        ),
        _not_in_diffusers("dbcache", "cache-dit is its reference (tests/cache_engine/test_dbcache.py)"),
    ),
    MethodCase(
        "teacache",
        f"rel_l1_thresh={TEA_THRESHOLD}, identity polynomial",
        lambda f, n: ce.TeaCacheConfig(rel_l1_thresh=TEA_THRESHOLD, coefficients=(1.0, 0.0), num_steps=n),
        _not_in_diffusers(
            "teacache", "its paper's rule is the reference (tests/cache_engine/test_teacache.py)"
        ),
    ),
)
METHOD_NAMES = tuple(case.name for case in METHODS)


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
    # The method has no diffusers implementation to run (its error says which reference it has).
    not_in_diffusers: bool = False

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
                with self.engine.session(config.method.ours(self.spec, self.steps)) as session:
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
                transformer.enable_cache(config.method.theirs(self.spec, self._current_timestep, self.steps))
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


def _paired(numerator: Outcome, denominator: Outcome, clock: Clock = "cpu") -> Ratio:
    """Numerator over denominator, run by run within each unit; the median over the units."""
    bottom = denominator.by_unit(clock)
    return Ratio.of(
        [time / bottom[unit] for unit, time in numerator.by_unit(clock).items() if unit in bottom]
    )


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
    speedup = _paired(base, outcome) if timed else None
    wall_speedup = _paired(base, outcome, "wall") if timed else None
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
    if theirs_outcome.not_in_diffusers:
        notes.append("not in diffusers")
    elif theirs.error is not None:
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
            outcome.not_in_diffusers = isinstance(error, NotInDiffusers)
    plain_output, reference_output = outcomes[PLAIN.key].output, outcomes[REFERENCE_PLAIN.key].output
    assert plain_output is not None and reference_output is not None
    if not torch.equal(plain_output, reference_output):
        raise RuntimeError(f"{family}: the two pipelines disagree with no cache; the comparison is void")
    # Every module the engine wraps: the denoiser, its blocks, its attention modules.
    engine = bench.set_engine(True)
    assert engine is not None
    dispatchers = 1 + len(engine.layout.blocks) + len(engine.layout.attention)

    prof = profile(bench.probes, [lambda: bench.run_plain().cpu] * max(1, min(repeats, 3)))

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
        idle_overhead=_paired(idle, plain),
        wall_idle_overhead=_paired(idle, plain, "wall"),
        instance_noise=_paired(outcomes[REFERENCE_PLAIN.key], plain),
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
    parser.add_argument(
        "--compile",
        action="store_true",
        help="instead: compiled blocks against eager, uncached and under each method, and recompilations",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend for --compile (default inductor)"
    )
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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class _Start:
    """What both entry points begin with: the arguments, the models' scale, the order's seeded
    generator and the time the benchmark started."""

    args: argparse.Namespace
    scale: models.ScaleName
    rng: random.Random
    started: float

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _start(argv: Sequence[str] | None) -> _Start:
    args = _parse(argv)
    # diffusers warns on every enable_cache (FasterCache is "experimental", a default weight is used);
    # the table says what each run did.
    diffusers.utils.logging.set_verbosity_error()
    scale: models.ScaleName = "quick" if args.quick else "bench"
    return _Start(args, scale, random.Random(args.seed), time.perf_counter())


def main(argv: Sequence[str] | None = None) -> Report:
    start = _start(argv)
    args = start.args
    family_rows: list[FamilyRow] = []
    method_rows: list[MethodRow] = []
    with _torch_threads(args.threads), _frozen_heap():
        for family in args.families:
            _log(f"{family}: building and warming up")
            family_row, rows = bench_family(
                family, scale=start.scale, steps=args.steps, repeats=args.repeats, rng=start.rng, log=_log
            )
            family_rows.append(family_row)
            method_rows.extend(rows)
        dispatch = dispatch_cost(calls=2_000 if args.quick else 20_000)
    report = Report(
        method_settings=tuple((case.name, case.settings) for case in METHODS),
        families=family_rows,
        methods=method_rows,
        dispatch=dispatch,
        steps=args.steps,
        repeats=args.repeats,
        scale=start.scale,
        threads=args.threads,
        seconds=start.seconds(),
    )
    print(render_text(report))
    if args.markdown is not None:
        args.markdown.write_text(render_markdown(report))
    if args.plot is not None:
        plot_report(report, args.plot)
    return report


def main_compiled(argv: Sequence[str] | None = None) -> list[compiled.FamilyResult]:
    """``--compile``: compiled against eager per configuration, and recompilations across sizes."""
    start = _start(argv)
    args = start.args
    cases = [compiled.Case("uncached", None), *(compiled.Case(case.name, case.ours) for case in METHODS)]
    results = []
    with _torch_threads(args.threads):
        for family in args.families:
            results.append(
                compiled.bench_family(
                    family,
                    cases,
                    build=functools.partial(models.build, family, scale=start.scale, steps=args.steps),
                    steps=args.steps,
                    repeats=args.repeats,
                    rng=start.rng,
                    log=_log,
                    backend=args.compile_backend,
                )
            )
    header = (
        f"Run: {args.steps} steps, {args.repeats} repeats, scale {start.scale}, {args.threads} torch thread(s), "
        f"backend {args.compile_backend}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{os.cpu_count()} CPUs; the benchmark took {start.seconds():.0f} s. Times: CPU time "
        "of the process; every ratio the median over the repeats of runs made back to back (range)."
    )
    table = compiled.render(results, header=header)
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table)
    return results


if __name__ == "__main__":
    if "--compile" in sys.argv[1:]:
        main_compiled()
    else:
        main()
