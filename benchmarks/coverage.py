"""What each caching method does on every transformer class diffusers exports: ``python -m benchmarks.coverage``.

Each class is built tiny and seeded (``tiny_pipelines.transformers``) and run for six denoiser calls
under each method, twice:

- the same input at every call: a correct cache gives back the uncached output at every call (largest
  difference at most 1e-4 of the output's largest value);
- a moving input (latents drifting, the timestep falling as in a denoising loop): something is reused.

The outcome is one of ``acts`` (both hold), ``refused`` (the policy is refused when it is checked, with
the engine's reason), ``fails`` (it raises during the run), ``wrong`` (the first run gives another
output) or ``no effect`` (nothing reused). The engine's promise is that only the first two occur; the
engine's tests hold it (``tests/cache_engine/test_every_transformer.py``). This writes the table to
``docs/coverage.md`` (``--out``), with the counts per method.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cache_engine as ce
from tiny_pipelines.transformers import TinyTransformer
from tiny_pipelines.transformers.catalog import TINY_TRANSFORMERS

CALLS = 6
TOLERANCE = 1e-4

# A config per method at which it reuses whatever it can within six calls: thresholds no change reaches,
# warmups of one call. FasterCache is left out: on a batch it takes for [unconditional, conditional] it
# approximates the first half from the second, so equal inputs give a different output by design.
CONFIGS: Mapping[str, Callable[[], object]] = {
    "first_block_cache": lambda: ce.FirstBlockCacheConfig(threshold=100.0),
    "mag_cache": lambda: ce.MagCacheConfig(
        threshold=100.0,
        max_skip_steps=2,
        retention_ratio=0.0,
        num_inference_steps=CALLS,
        mag_ratios=(1.0,) * CALLS,
    ),
    "dbcache": lambda: ce.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=100.0, max_warmup_steps=1
    ),
    "teacache": lambda: ce.TeaCacheConfig(rel_l1_thresh=100.0, coefficients=(1.0, 0.0)),
    "sea_cache": lambda: ce.SeaCacheConfig(threshold=100.0, num_inference_steps=CALLS),
    "taylorseer": lambda: ce.TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32
    ),
    "taylorseer_lite": lambda: ce.TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32, use_lite_mode=True
    ),
    "guarded_taylorseer": lambda: ce.GuardedTaylorSeerCacheConfig(step_tolerance=1e6),
    "pyramid_attention_broadcast": lambda: ce.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        temporal_attention_block_skip_range=2,
        cross_attention_block_skip_range=2,
    ),
}
METHODS: tuple[str, ...] = tuple(CONFIGS)


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str  # acts, refused, fails, wrong, no effect
    detail: str = ""


@dataclasses.dataclass
class Subject:
    """One class built, its engine, and its uncached outputs on both runs."""

    tiny: TinyTransformer
    model: nn.Module
    kwargs: dict[str, Any]
    engine: ce.CacheEngine
    still: torch.Tensor
    moving_inputs: list[dict[str, Any]]


def sample_of(output: Any) -> torch.Tensor:
    """The denoised sample in a denoiser's output (a tuple, a list per sample, or an output object)."""
    while not isinstance(output, torch.Tensor):
        output = output[0] if isinstance(output, (tuple, list)) else output.sample
    return output


def moving_inputs(tiny: TinyTransformer, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """Six calls as a denoising loop makes them: the latents drifting, the timestep moving to its end."""
    latent = kwargs[tiny.latent]
    # Some denoisers take their latents as a list of per-sample tensors (Z-Image, Cosmos 3).
    latents = list(latent) if isinstance(latent, list) else [latent]
    generator = torch.Generator().manual_seed(1)
    drifts = [torch.randn(one.shape, generator=generator, dtype=one.dtype) for one in latents]
    inputs = []
    for call in range(CALLS):
        moved = dict(kwargs)
        shifted = [one + 0.05 * call * drift for one, drift in zip(latents, drifts, strict=True)]
        moved[tiny.latent] = shifted if isinstance(latent, list) else shifted[0]
        if tiny.timestep is not None:
            timestep = kwargs[tiny.timestep]
            value = tiny.timestep_start + (tiny.timestep_end - tiny.timestep_start) * (0.1 + 0.15 * call)
            moved[tiny.timestep] = (
                torch.full_like(timestep, value) if isinstance(timestep, torch.Tensor) else value
            )
        inputs.append(moved)
    return inputs


def subject(tiny: TinyTransformer) -> Subject:
    """``tiny`` built, with an engine installed and its uncached output on the still input."""
    model, kwargs = tiny.build()
    with torch.no_grad():
        still = sample_of(model(**kwargs)).clone()
    if not torch.isfinite(still).all():
        raise ValueError(f"the tiny {tiny.class_name} gives a non-finite output uncached")
    return Subject(tiny, model, kwargs, ce.CacheEngine(model), still, moving_inputs(tiny, kwargs))


def outcome(subject: Subject, method: str) -> Outcome:
    config = CONFIGS[method]()
    try:
        subject.engine.check(config)
    except ce.UnsupportedMethodError as error:
        return Outcome("refused", str(error).split(": ", 1)[-1])
    model = subject.model
    try:
        with torch.no_grad():
            with subject.engine.session(config):
                errors = [
                    relative_error(sample_of(named_call(model, subject.kwargs)), subject.still)
                    for _ in range(CALLS)
                ]
            with subject.engine.session(config) as session:
                for inputs in subject.moving_inputs:
                    sample_of(named_call(model, inputs))
                stats = session.stats
    except Exception as error:  # the outcome being measured: any failure during a run
        return Outcome("fails", f"{type(error).__name__}: {error}"[:160])
    if any(not math.isfinite(error) or error > TOLERANCE for error in errors):
        return Outcome("wrong", f"differs by {max(errors):.2g} of the output's largest value")
    if not _reused(stats):
        return Outcome("no effect")
    return Outcome("acts")


def named_call(model: nn.Module, inputs: dict[str, Any]) -> Any:
    """One denoiser call as a pipeline makes it, in a named pass: calls with equal inputs are then
    steps of one pass, not passes of one step."""
    named: Any = model  # cache_context is the engine's, set on the model when it was installed
    with named.cache_context("cond"):
        return model(**inputs)


def _reused(stats: ce.SessionStats) -> bool:
    return stats.blocks_reused + stats.attention_reused > 0 or stats.steps_cached > 0


def relative_error(output: torch.Tensor, expected: torch.Tensor) -> float:
    return float((output - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def table(outcomes: Mapping[str, Mapping[str, Outcome]]) -> str:
    lines = [
        "| class | " + " | ".join(f"`{method}`" for method in METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for class_name, row in outcomes.items():
        cells = ["acts" if row[m].kind == "acts" else f"**{row[m].kind}**" for m in METHODS]
        lines.append(f"| `{class_name}` | " + " | ".join(cells) + " |")
    counts = {method: Counter(row[method].kind for row in outcomes.values()) for method in METHODS}
    lines.append(
        "| **acts / refused** | "
        + " | ".join(f"{counts[m]['acts']} / {counts[m]['refused']}" for m in METHODS)
        + " |"
    )
    return "\n".join(lines)


def reasons(outcomes: Mapping[str, Mapping[str, Outcome]]) -> str:
    """Each distinct reason a method is refused, with the classes it is refused on."""
    found: dict[tuple[str, str], list[str]] = {}
    for class_name, row in outcomes.items():
        for method in METHODS:
            if row[method].kind != "acts":
                found.setdefault((method, f"{row[method].kind}: {row[method].detail}"), []).append(class_name)
    return "\n".join(
        f"- `{method}`, {reason}: {', '.join(f'`{name}`' for name in names)}"
        for (method, reason), names in sorted(found.items())
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/coverage.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    outcomes: dict[str, dict[str, Outcome]] = {}
    for tiny in sorted(TINY_TRANSFORMERS, key=lambda one: one.class_name):
        built = subject(tiny)
        try:
            outcomes[tiny.class_name] = {method: outcome(built, method) for method in METHODS}
        finally:
            built.engine.close()
        print(tiny.class_name, {m: o.kind for m, o in outcomes[tiny.class_name].items()}, flush=True)
    broken = sum(o.kind in ("fails", "wrong", "no effect") for row in outcomes.values() for o in row.values())
    text = f"""# Every transformer class, under every method

Generated by `python -m benchmarks.coverage`; do not edit by hand.

Each of the {len(outcomes)} transformer classes diffusers 0.42.1 exports for images and video is built
tiny and seeded (`tiny_pipelines/transformers/`) and run for six denoiser calls under each method: with the
same input at every call, a correct cache gives back the uncached output; with a moving input (latents
drifting, the timestep falling), it reuses something. **acts**: both hold. **refused**: the policy is
refused when it is checked (a 422 naming the method, before the request is queued), with the reason
below. Any other outcome (a failure during the run, a wrong output, no effect) is a bug; here there are
{broken}.

{table(outcomes)}

`taylorseer_lite` is TaylorSeer with `use_lite_mode`: the blocks skipped, the output projection
predicted. FasterCache is not in the table: on a batch it takes for [unconditional, conditional], it
approximates the first half from the second by design. TeaCache needs the first block's
timestep-modulated input, which the engine reads for the block classes in its table, each checked
against what that block's attention receives.

## Why a method is refused

{reasons(outcomes)}
"""
    args.out.write_text(text)
    print(f"wrote {args.out}; {broken} outcomes other than acts or refused")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
