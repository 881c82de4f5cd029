"""Compiled blocks against eager, uncached and under each cache method: ``python -m benchmarks.engine --compile``.

Per family, two pipelines built from the same seed, each with a :class:`cache_engine.CacheEngine`; one
has its blocks compiled the way the server's ``--compile`` does it (``server.ops.acceleration``). The
compiled one is warmed at two sizes in both of a block's compiled forms (whole, and split around its
attention calls), then run at five other request sizes under every method, counting
the frames Dynamo compiles (recompilations; the target is none). Then, interleaved and repeated, each
configuration runs on both pipelines back to back: the ratio eager/compiled per configuration is the
speedup of compilation under that method, and compiled-uncached/compiled-method the method's own
speedup on top of compilation. Outputs are compared at the benchmark size, per method.

The same code runs on a GPU from ``benchmarks.gpu``, with larger configurations and wall-clock time.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

import cache_engine as ce
from cache_engine.targets import build_layout
from server.ops import acceleration
from server.runtime.warm_up import warm_up_passes

Clock = Callable[[], float]


class Bench(Protocol):
    """A pipeline and its call: ``benchmarks.models.BenchPipeline``, or ``benchmarks.gpu``'s."""

    call_kwargs: dict[str, Any]

    @property
    def family(self) -> Any: ...

    @property
    def pipe(self) -> Any: ...

    @property
    def transformer(self) -> nn.Module: ...


@dataclass(frozen=True)
class Case:
    """A configuration timed on both pipelines: no cache, or one method at its benchmark config."""

    name: str
    # Receives the family and the run's step count, as benchmarks.engine.METHODS do.
    config: Callable[[Any, int], object] | None


@dataclass
class CaseResult:
    name: str
    eager_ms: float = 0.0  # per step, median
    compiled_ms: float = 0.0
    speedup: tuple[float, float, float] = (0.0, 0.0, 0.0)  # eager / compiled: median, low, high
    over_uncached: tuple[float, float, float] | None = None  # compiled uncached / compiled method
    max_abs_diff: float = 0.0  # compiled against eager output, same method
    same_work: bool = True  # both ran the same blocks and attention calls
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class FamilyResult:
    family: str
    label: str
    compile_seconds: float
    warm_frames: int
    recompiles: int
    sizes: list[tuple[int, ...]]
    cases: list[CaseResult]


def compile_pipeline(bp: Bench, *, backend: str = "inductor", mode: str | None = None) -> ce.CacheEngine:
    """The server's ``--compile`` on a benchmark pipeline: blocks compiled, then the engine, then sealed."""
    layout = build_layout(bp.transformer)
    acceleration.compile_blocks(
        [site.module for site in layout.blocks],
        [site.module for site in layout.attention],
        backend=backend,
        mode=mode,
    )
    engine = ce.CacheEngine(bp.transformer)
    acceleration.seal(bp.transformer)
    return engine


def _resized(bp: Bench, size: tuple[int, ...], steps: int) -> dict[str, Any]:
    kwargs = dict(bp.call_kwargs, height=size[0], width=size[1], num_inference_steps=steps)
    if len(size) > 2:
        kwargs["num_frames"] = size[2]
    return kwargs


def _call(bp: Bench, kwargs: dict[str, Any]) -> torch.Tensor:
    pipe: Any = bp.pipe
    device = getattr(pipe, "device", torch.device("cpu"))
    output = pipe(**kwargs, generator=torch.Generator(device).manual_seed(0))
    return output[0]


def request_sizes(bp: Bench) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(two warm-up sizes, five request sizes): non-square, all multiples of 32 pixels, frames 4k + 1."""
    height, width = bp.call_kwargs["height"], bp.call_kwargs["width"]
    frames = bp.call_kwargs.get("num_frames")
    unit = 16 if min(height, width) < 128 else 32

    def size(dh: int, dw: int, df: int = 0) -> tuple[int, ...]:
        spatial = (max(unit, height + dh * unit), max(unit, width + dw * unit))
        return spatial if frames is None else (*spatial, max(1, frames + 4 * df))

    warm = [size(0, 0), size(-1, 1, 1)]
    requests = [size(1, -1, -1), size(2, 2, 1), size(-2, 0, 0), size(0, 1, 2), size(1, 0, 1)]
    return warm, requests


def bench_family(
    family: str,
    cases: Sequence[Case],
    *,
    build: Callable[[], Bench],
    steps: int,
    repeats: int,
    rng: random.Random,
    log: Callable[[str], None],
    clock: Clock = time.process_time,
    backend: str = "inductor",
    mode: str | None = None,
    sync: Callable[[], None] = lambda: None,
) -> FamilyResult:
    eager, compiled = build(), build()
    engines = {
        "eager": ce.CacheEngine(eager.transformer),
        "compiled": compile_pipeline(compiled, backend=backend, mode=mode),
    }
    pipes = {"eager": eager, "compiled": compiled}
    spec = eager.family
    warm, requests = request_sizes(eager)

    log(f"{family}: compiling (warm-up at {warm})")
    timer = acceleration.CompileClock()
    with timer.measure():
        # The server's warm-up passes: both forms of each block, and the whole one replaying attention.
        for warm_up in warm_up_passes():
            for size in warm:
                with engines["compiled"].session(warm_up.config, whole_blocks=warm_up.whole_blocks):
                    _call(compiled, _resized(compiled, size, warm_up.min_steps))
        sync()
    log(f"{family}: {timer.frames} graphs in {timer.seconds:.0f} s; five request sizes under every method")
    before = acceleration.compiled_frames()
    for size in requests:
        for case in cases:
            with engines["compiled"].session(None if case.config is None else case.config(spec, 3)):
                _call(compiled, _resized(compiled, size, 3))
    recompiles = acceleration.compiled_frames() - before

    results = {case.name: CaseResult(case.name) for case in cases}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    stats: dict[tuple[str, str], ce.SessionStats] = {}

    def run(side: str, case: Case) -> float:
        config = None if case.config is None else case.config(spec, steps)
        bp = pipes[side]
        kwargs = _resized(bp, tuple(warm[0]), steps)
        gc.collect()
        sync()
        start = clock()
        with engines[side].session(config) as session:
            output = _call(bp, kwargs)
            sync()
        elapsed = clock() - start
        outputs[(side, case.name)] = output
        stats[(side, case.name)] = session.stats
        return elapsed

    for case in cases:  # untimed: outputs and work done
        for side in pipes:
            run(side, case)
        result = results[case.name]
        eager_out, compiled_out = outputs[("eager", case.name)], outputs[("compiled", case.name)]
        result.max_abs_diff = float((eager_out.float() - compiled_out.float()).abs().max())
        eager_stats, compiled_stats = stats[("eager", case.name)], stats[("compiled", case.name)]
        result.same_work = dataclasses.replace(eager_stats, peak_bytes=0) == dataclasses.replace(
            compiled_stats, peak_bytes=0
        )

    uncached = cases[0]
    for repeat in range(repeats):
        units = [[uncached] if case is uncached else [uncached, case] for case in cases]
        rng.shuffle(units)
        for unit in units:
            order = [(side, case) for case in unit for side in pipes]
            rng.shuffle(order)
            times = {(side, case.name): run(side, case) for side, case in order}
            for (side, name), seconds in times.items():
                results[name].samples.setdefault(side, []).append(seconds)
            case = unit[-1]
            results[case.name].samples.setdefault("ratio", []).append(
                times[("eager", case.name)] / times[("compiled", case.name)]
            )
            if case is not uncached:
                results[case.name].samples.setdefault("over", []).append(
                    times[("compiled", uncached.name)] / times[("compiled", case.name)]
                )
        log(f"  {family}: repeat {repeat + 1}/{repeats} done")

    for result in results.values():
        result.eager_ms = 1e3 * statistics.median(result.samples["eager"]) / steps
        result.compiled_ms = 1e3 * statistics.median(result.samples["compiled"]) / steps
        result.speedup = _spread(result.samples["ratio"])
        if "over" in result.samples:
            result.over_uncached = _spread(result.samples["over"])
    for engine in engines.values():
        engine.close()
    return FamilyResult(
        family=family,
        label=spec.label,
        compile_seconds=timer.seconds,
        warm_frames=timer.frames,
        recompiles=recompiles,
        sizes=requests,
        cases=[results[case.name] for case in cases],
    )


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


TARGET = 1.15  # compiled at least this much faster per step than eager, uncached and under each method


def render(results: Sequence[FamilyResult], *, header: str, clock: str = "cpu") -> str:
    """Markdown: one table of every family and configuration, then the verdicts."""
    lines = [
        header,
        "",
        f"| family | method | ms/step eager ({clock}) | ms/step compiled ({clock}) | compiled speedup | "
        "method speedup on compiled | max \\|compiled - eager\\| | same work |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family in results:
        for case in family.cases:
            over = "-" if case.over_uncached is None else _ratio(case.over_uncached)
            lines.append(
                f"| {family.family} | {case.name} | {case.eager_ms:.1f} | {case.compiled_ms:.1f} | "
                f"{_ratio(case.speedup)} | {over} | {case.max_abs_diff:.1e} | "
                f"{'yes' if case.same_work else 'no'} |"
            )
    lines += [
        "",
        "| family | warm-up (compile) s | graphs compiled in warm-up | request sizes after warm-up | recompilations |",
        "|---|---|---|---|---|",
    ]
    for family in results:
        sizes = ", ".join("x".join(map(str, size)) for size in family.sizes)
        lines.append(
            f"| {family.family} | {family.compile_seconds:.0f} | {family.warm_frames} | {sizes} | {family.recompiles} |"
        )
    lines += ["", *verdicts(results)]
    return "\n".join(lines) + "\n"


def verdicts(results: Sequence[FamilyResult]) -> list[str]:
    lines = []
    for family in results:
        missed = [case.name for case in family.cases if case.speedup[0] < TARGET]
        lines.append(
            f"- {family.family}: compiled at least {TARGET}x faster per step in "
            f"{len(family.cases) - len(missed)}/{len(family.cases)} configurations"
            + (f" (missed: {', '.join(missed)})" if missed else "")
            + f"; {family.recompiles} recompilations across {len(family.sizes)} request sizes x "
            f"{len(family.cases)} policies"
        )
    return lines


def _ratio(value: tuple[float, float, float]) -> str:
    return f"{value[0]:.2f} ({value[1]:.2f}-{value[2]:.2f})"
