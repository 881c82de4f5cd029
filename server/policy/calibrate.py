"""``ditcache calibrate``: measure a model's speed against fidelity under the policies a target picks from.

It first fits the values some methods need per checkpoint (MagCache's ratios, TeaCache's polynomial).
Then, for each setting asked (step count, guidance on and off), every calibration prompt runs uncached
and under each policy (``target_policies``: guarded TaylorSeer at each knob), back to back, so that a
shared machine's slow drift falls on all policies alike. Per policy: the pooled PSNR of its outputs
against the uncached ones (from the mean squared error over every pixel of every prompt), the worst
prompt's PSNR, the PSNR other prompts keep with 95% confidence (what a target's floor is held to), and
the speedup (the median over prompts of the uncached time over the cached time); per setting, the line
from a guarded run's own error estimate to its PSNR. The result is the model's calibration
(``server/models/calibration.py``): what a ``target`` request chooses from.

Bounded and resumable: results are kept per prompt in a work file next to the output, so a run that
stops (its ``--time-limit``, or Ctrl-C) resumes where it was; the curves are written from the prompts
done so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache_engine import CacheConfig
from server.models.calibration import (
    TARGET_METHODS,
    Calibration,
    Curve,
    CurvePoint,
    EstimateFit,
    load_calibration,
    merged,
    psnr_to_json,
    tail_psnr,
)
from server.models.generation import GenerationParams, check_params, generate
from server.models.registry import ResidentModel, calibration_path, load_model
from server.policy import engine_config as policies
from server.policy.fidelity import output_pixels, psnr_of
from server.policy.resolve import PRESET_FLOORS
from server.policy.trajectory_rule import calibrate_trajectories

# Subjects, colours and places drawn in turn: generic prompts, for a model whose traffic is not known.
# A model trained on a narrow domain is better calibrated on prompts like its own (--prompts-file).
_SUBJECTS = ("cat", "boat", "house", "tree", "bird", "car", "flower", "horse")
_COLOURS = ("red", "blue", "green", "yellow", "white", "purple", "orange", "black")
_PLACES = ("on the sea", "in a forest", "at night", "under the sun", "in the snow", "in a city")


# Prompts MagCache's ratios and TeaCache's polynomial are measured on: the first of the calibration set.
FIT_PROMPTS = 4
# What the trajectory rule is measured on: each prompt runs once, then from its neighbours at every kept step.
TRAJECTORY_PROMPTS = 24


def calibration_prompts(count: int) -> list[str]:
    return [
        f"a {_COLOURS[i % len(_COLOURS)]} {_SUBJECTS[(i // 2) % len(_SUBJECTS)]} {_PLACES[i % len(_PLACES)]}"
        for i in range(count)
    ]


def sweep_policies() -> list[dict[str, Any]]:
    """Each method's main knobs, from faithful to fast; a model skips the methods it cannot run.

    TaylorSeer's longer intervals and later starts are there for long runs (50 steps), where they keep
    more of the image than at 20. MagCache and TeaCache run with the values fitted for the model.
    """
    policies: list[dict[str, Any]] = []
    for threshold in (0.05, 0.1, 0.15, 0.2, 0.3):
        policies.append({"method": "first_block_cache", "threshold": threshold})
    for interval, start in (
        (2, 3),
        (3, 3),
        (4, 3),
        (5, 3),
        (6, 3),
        (8, 3),
        (4, 2),
        (6, 2),
        (8, 5),
        (10, 5),
        (12, 5),
        (10, 3),
        (12, 3),
        (16, 3),
    ):
        policies.append(
            {
                "method": "taylorseer",
                "cache_interval": interval,
                "disable_cache_before_step": start,
                "taylor_factors_dtype": "float32",
                "use_lite_mode": True,
            }
        )
    for skip in (2, 3, 4):
        policies.append({"method": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": skip})
    for skip in (2, 3):
        policies.append({"method": "faster_cache", "spatial_attention_block_skip_range": skip})
    for threshold, max_skip, retention in ((0.06, 3, 0.2), (0.12, 3, 0.2), (0.25, 3, 0.2), (0.6, 4, 0.1)):
        policies.append(
            {
                "method": "mag_cache",
                "threshold": threshold,
                "max_skip_steps": max_skip,
                "retention_ratio": retention,
            }
        )
    for threshold in (0.05, 0.1, 0.15, 0.2):
        policies.append({"method": "teacache", "rel_l1_thresh": threshold})
    for threshold, warmup in ((0.1, 4), (0.2, 4), (0.3, 4), (0.2, 2), (0.3, 2)):
        policies.append(
            {
                "method": "dbcache",
                "Fn_compute_blocks": 1,
                "Bn_compute_blocks": 0,
                "residual_diff_threshold": threshold,
                "max_warmup_steps": warmup,
                "enable_taylorseer": True,
                "taylorseer_order": 1,
            }
        )
    for threshold in (0.1, 0.25, 1.0):
        policies.append({"method": "sea_cache", "threshold": threshold})
    return [*policies, *guarded_policies()]


def guarded_policies() -> list[dict[str, Any]]:
    """Guarded TaylorSeer from faithful to fast: its step tolerance, and a longer reach between full
    steps for long runs."""
    policies: list[dict[str, Any]] = [
        {"method": "guarded_taylorseer", "step_tolerance": tolerance}
        for tolerance in (0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)
    ]
    for tolerance in (0.5, 1.0):
        policies.append({"method": "guarded_taylorseer", "step_tolerance": tolerance, "max_interval": 10})
    return policies


def target_policies() -> list[dict[str, Any]]:
    """What ``ditcache calibrate`` measures: the policies a target may choose (``TARGET_METHODS``)."""
    policies = guarded_policies()
    assert all(policy["method"] in TARGET_METHODS for policy in policies)
    return policies


@dataclass(frozen=True)
class Setting:
    steps: int
    guidance_scale: float

    @property
    def guidance(self) -> bool:
        return self.guidance_scale > 1

    @property
    def key(self) -> str:
        return f"steps={self.steps},guidance={self.guidance_scale:g}"


def policy_key(policy: Mapping[str, Any]) -> str:
    """A swept policy as the work file and the benchmarks key it."""
    return json.dumps(dict(policy), sort_keys=True)


def engine_config(
    policy: Mapping[str, Any], method_values: Mapping[str, Mapping[str, Any]], steps: int
) -> CacheConfig | None:
    """The engine config a swept policy runs as at ``steps``, with the model's fitted values filled in."""
    fields = {name: value for name, value in policy.items() if name != "method"}
    return policies.engine_config(str(policy["method"]), fields, method_values, steps=steps)


def _config(
    model: ResidentModel,
    policy: Mapping[str, Any],
    steps: int,
    method_values: Mapping[str, Mapping[str, Any]],
) -> CacheConfig | None:
    config = engine_config(policy, method_values, steps)
    model.cache.check(config)
    return config


def run_policy(
    model: ResidentModel, params: GenerationParams, config: Any
) -> tuple[np.ndarray, float, float | None]:
    """The output's pixels, the seconds it took, and the policy's own estimate of its error (guarded)."""
    started = time.perf_counter()
    with model.cache.session(config) as run:
        result = generate(model, params)
    elapsed = time.perf_counter() - started
    estimate = run.stats.estimated_error if run.stats is not None else None
    return output_pixels(result), elapsed, estimate


def params_for(model: ResidentModel, setting: Setting, prompt: str, seed: int) -> GenerationParams:
    params = GenerationParams.from_defaults(
        model.defaults, prompt=prompt, steps=setting.steps, guidance_scale=setting.guidance_scale, seed=seed
    )
    check_params(model, params)
    return params


def fit_method_values(
    model: ResidentModel, setting: Setting, prompts: Sequence[str], log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """MagCache's magnitude ratios and TeaCache's rescaling polynomial for this checkpoint, measured on
    uncached runs (every block computed) of ``prompts`` at ``setting``, every CFG branch pooled."""
    from cache_engine import MagCacheConfig, TeaCacheConfig, mag_cache, teacache

    engines = model.cache.engines
    if len(engines) != 1:
        # Each expert of a multi-transformer model would need its own values; the config carries one.
        log(f"  per-checkpoint values not fitted: the model has {len(engines)} transformers")
        return {}
    engine, supported = engines[0], model.cache.supported_methods
    values: dict[str, dict[str, Any]] = {}
    if "mag_cache" in supported:
        curves: list[tuple[float, ...]] = []
        for seed, prompt in enumerate(prompts):
            config = MagCacheConfig(calibrate=True, num_inference_steps=setting.steps)
            with engine.session(config) as session:
                generate(model, params_for(model, setting, prompt, seed))
                curves.extend(mag_cache.calibrated_ratios(session).values())
        curves = [curve for curve in curves if len(curve) == setting.steps]
        if curves:
            ratios = np.mean(np.asarray(curves, dtype=np.float64), axis=0)
            values["mag_cache"] = {"mag_ratios": [round(float(r), 5) for r in ratios]}
            log(f"  mag_cache: mag_ratios from {len(curves)} runs of {setting.steps} steps")
    if "teacache" in supported:
        pairs: list[tuple[float, float]] = []
        for seed, prompt in enumerate(prompts):
            with engine.session(TeaCacheConfig(calibrate=True)) as session:
                generate(model, params_for(model, setting, prompt, seed))
                pairs.extend(teacache.calibration_pairs(session))
        try:
            values["teacache"] = {"coefficients": list(teacache.fit_coefficients(pairs))}
            log(f"  teacache: coefficients fitted to {len(pairs)} consecutive calls")
        except ValueError as exc:
            log(f"  teacache: coefficients not fitted: {exc}")
    return values


def run_setting(
    model: ResidentModel,
    setting: Setting,
    prompts: Sequence[str],
    policies: Sequence[Mapping[str, Any]],
    method_values: Mapping[str, Mapping[str, Any]],
    work: dict[str, Any],
    *,
    stop_at: float,
    save: Callable[[], None],
    log: Callable[[str], None],
    advance: Callable[[], None] = lambda: None,
) -> None:
    """Fill ``work[setting.key][prompt index]`` with each policy's (squared error sum, pixels, seconds,
    and its own error estimate when it makes one)."""
    done: dict[str, Any] = work.setdefault(setting.key, {})
    runnable = []
    for policy in policies:
        try:
            runnable.append((policy, _config(model, policy, setting.steps, method_values)))
        except Exception as exc:  # a method this model cannot run, or one missing calibrated values
            log(f"  skipped {policy_key(policy)}: {exc}")
    for index, prompt in enumerate(prompts):
        row: dict[str, Any] | None = done.get(str(index))
        missing = [(p, c) for p, c in runnable if row is None or policy_key(p) not in row]
        if not missing:
            advance()
            continue
        if time.monotonic() >= stop_at:
            log(f"  time limit: {index} of {len(prompts)} prompts done")
            return
        params = params_for(model, setting, prompt, index)
        reference, reference_s, _ = run_policy(model, params, None)
        if row is None:
            row = {"none": [0.0, reference.size, reference_s]}
        # Policies added to the sweep since this prompt was measured: timed against a fresh uncached
        # run, and scaled to the recorded one, so that each keeps its own ratio to the uncached time.
        scale = row["none"][2] / reference_s
        for policy, config in missing:
            pixels, seconds, estimate = run_policy(model, params, config)
            squared = float(((pixels - reference) ** 2).sum())
            row[policy_key(policy)] = [squared, pixels.size, seconds * scale, estimate]
        done[str(index)] = row
        save()
        log(f"  prompt {index + 1}/{len(prompts)} ({setting.key})")
        advance()


# One-sided 95%: the normal quantile for the upper bound of a mean.
_BOUND_Z = 1.645


def psnr_bound(per_prompt_mse: Sequence[float]) -> float:
    """The pooled PSNR that other prompts like these keep with 95% confidence: from the upper bound of
    the mean squared error (the mean plus z standard errors over prompts). One prompt has no spread
    to bound with, so it promises its own PSNR."""
    mean = statistics.fmean(per_prompt_mse)
    spread = (
        statistics.stdev(per_prompt_mse) / math.sqrt(len(per_prompt_mse)) if len(per_prompt_mse) > 1 else 0.0
    )
    return psnr_of(mean + _BOUND_Z * spread, 1.0)


def curve_of(setting: Setting, rows: Mapping[str, Mapping[str, Sequence[float]]]) -> Curve | None:
    if not rows:
        return None
    keys = set.intersection(*(set(row) for row in rows.values()))
    points = []
    for key in sorted(keys):
        squared = sum(row[key][0] for row in rows.values())
        count = sum(row[key][1] for row in rows.values())
        per_prompt = [row[key][0] / row[key][1] for row in rows.values()]
        psnrs = [psnr_of(row[key][0], row[key][1]) for row in rows.values()]
        policy = {"method": "none"} if key == "none" else json.loads(key)
        # The median over prompts of each prompt's own ratio: a burst of load from elsewhere during
        # one prompt's runs moves that prompt's ratio, not the curve.
        speedup = (
            1.0 if key == "none" else statistics.median(row["none"][2] / row[key][2] for row in rows.values())
        )
        points.append(
            CurvePoint(
                policy,
                psnr_of(squared, count),
                speedup,
                min(psnrs),
                psnr_bound(per_prompt),
                tail_psnr(psnrs),
            )
        )
    estimates = [
        (row[key][3], psnr_of(row[key][0], row[key][1]))
        for row in rows.values()
        for key in keys
        if len(row[key]) > 3 and row[key][3] is not None
    ]
    return Curve(
        setting.steps, setting.guidance, setting.guidance_scale, tuple(points), fit_estimate(estimates)
    )


def fit_estimate(pairs: Sequence[tuple[float, float]]) -> EstimateFit | None:
    """The line through (log10 estimate, PSNR) of guarded runs; runs that predicted nothing (estimate 0,
    identical output) say nothing of the slope and are left out. None with fewer than 3 runs left."""
    points = [
        (math.log10(estimate), psnr) for estimate, psnr in pairs if estimate > 0 and math.isfinite(psnr)
    ]
    if len(points) < 3:
        return None
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    if float(np.ptp(x)) == 0.0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    spread = float(np.std(y - (intercept + slope * x), ddof=2))
    return EstimateFit(
        intercept=round(float(intercept), 3),
        slope=round(float(slope), 3),
        spread=round(spread, 3),
        runs=len(points),
    )


def calibrate(
    model: ResidentModel,
    settings: Sequence[Setting],
    prompts: Sequence[str],
    out: Path,
    *,
    time_limit_s: float,
    policies: Sequence[Mapping[str, Any]] | None = None,
    log: Callable[[str], None] = print,
    advance: Callable[[], None] = lambda: None,
    adapter: tuple[str, float] | None = None,
) -> Calibration:
    """Run the sweep (resuming from ``out``'s work file) and write the calibration to ``out``.

    ``advance`` is called once per prompt of each setting, measured now or found done. With ``adapter``
    (name, scale), a LoRA adapter the model holds, every run applies it: the calibration is the adapted
    model's."""
    applied: AbstractContextManager[None] = nullcontext()
    if adapter is not None:
        if model.adapters is None or adapter[0] not in model.adapters:
            raise ValueError(f"{model.name} holds no adapter {adapter[0]!r}")
        applied = model.adapters.applied([adapter])
    work_path = out.with_suffix(".work.json")
    work: dict[str, Any] = json.loads(work_path.read_text()) if work_path.exists() else {}
    measured = work.get("prompts", [])
    # More prompts after the same ones extend the measurement; other prompts replace it.
    if list(prompts)[: len(measured)] != measured:
        log(f"{work_path} measured other prompts: starting afresh")
        work = {}
    work["prompts"] = list(prompts)

    def save() -> None:
        work_path.parent.mkdir(parents=True, exist_ok=True)
        work_path.write_text(json.dumps(work))

    stop_at = time.monotonic() + time_limit_s
    # An adapter's calibration starts from nothing measured: the base model's curves are not its own.
    base = model.calibration if adapter is None else Calibration(model=model.name, prompts=0)
    existing = load_calibration(out) if out.exists() else base
    method_values: dict[str, Mapping[str, Any]] = dict(existing.method_values)
    curves = tuple(existing.curves)
    with applied:
        if not method_values and settings:
            # The longest run samples the ratio curve most finely; shorter runs resample it.
            fit_at = max(settings, key=lambda setting: (setting.steps, setting.guidance))
            log(f"fitting per-checkpoint values at {fit_at.key} on {min(FIT_PROMPTS, len(prompts))} prompts")
            method_values = dict(fit_method_values(model, fit_at, prompts[:FIT_PROMPTS], log))
        for setting in settings:
            log(f"calibrating {model.name} at {setting.key} on {len(prompts)} prompts")
            run_setting(
                model,
                setting,
                prompts,
                policies or target_policies(),
                method_values,
                work,
                stop_at=stop_at,
                save=save,
                log=log,
                advance=advance,
            )
            curve = curve_of(setting, work.get(setting.key, {}))
            if curve is not None:
                curves = merged(curves, curve)
    calibration = Calibration(
        model=model.name,
        prompts=len(prompts),
        curves=curves,
        method_values=method_values,
        trajectory_rule=existing.trajectory_rule,
        adapter=adapter,
    )
    calibration.save(out)
    return calibration


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditcache calibrate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a built-in name, a local folder or a hub id")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: <cache-dir>/calibrations/<model>.json"
    )
    parser.add_argument("--prompts", type=int, default=12, help="generic calibration prompts (default 12)")
    parser.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help="one prompt per line, like the model's traffic (default: --prompts generic ones)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        action="append",
        default=None,
        help="step counts to calibrate (repeat; default: the model's)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        action="append",
        default=None,
        help="guidance scales to calibrate (repeat; default: the model's, and 1 = no guidance)",
    )
    parser.add_argument(
        "--trajectories",
        action="store_true",
        help='calibrate only the rule for similar prompts\' trajectories ("reuse": {"similar": ...}), '
        f"on up to {TRAJECTORY_PROMPTS} of the prompts at the first step count and guidance scale, and keep "
        "the policy curves",
    )
    parser.add_argument(
        "--lora",
        default=None,
        metavar="NAME=SOURCE",
        help="calibrate the model with this LoRA adapter applied (SOURCE a file, a folder or a hub id); "
        "the server uses it for requests naming NAME alone, at --lora-scale "
        "(default out: <cache-dir>/calibrations/<model>+<NAME>.json)",
    )
    parser.add_argument("--lora-scale", type=float, default=1.0, help="the adapter's scale (default 1)")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds in all (default 3600)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache-dir", type=Path, default=Path(".ditcache"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args)


def prompts_of(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is None:
        return calibration_prompts(args.prompts)
    prompts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"{args.prompts_file} holds no prompt")
    return prompts


def run(args: argparse.Namespace) -> int:
    lora = _lora_spec(args)
    model = load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        # What runs a request along a trajectory; the measurement keeps its own store.
        trajectory_cache_bytes=1 if args.trajectories else 0,
    )
    steps = args.steps or [model.defaults.steps]
    scales = args.guidance_scale or sorted({model.defaults.guidance_scale, 1.0})
    settings = [Setting(s, g) for s in steps for g in scales]
    adapter = None if lora is None else _loaded_adapter(model, *lora, args.lora_scale)
    out = args.out or calibration_path(args.cache_dir, model.name, None if adapter is None else adapter[0])
    prompts = prompts_of(args)
    if args.trajectories:
        return _run_trajectories(model, out, prompts[:TRAJECTORY_PROMPTS], steps[0], scales[0])
    from tqdm.auto import tqdm

    # A bar on a terminal; plain lines, one per prompt, in a log file.
    terminal = sys.stderr.isatty()
    with tqdm(total=len(settings) * len(prompts), unit="prompt", disable=not terminal) as bar:
        calibration = calibrate(
            model,
            settings,
            prompts,
            out,
            time_limit_s=args.time_limit,
            log=bar.write if terminal else lambda line: print(line, file=sys.stderr, flush=True),
            advance=bar.update,
            adapter=adapter,
        )
    for curve in calibration.curves:
        best = {floor: curve.fastest(floor) for floor in PRESET_FLOORS.values()}
        shown = ", ".join(
            f">= {floor:g} dB: {point.speedup:.2f}x" for floor, point in best.items() if point is not None
        )
        print(f"{curve.steps} steps, guidance {curve.guidance_scale:g}: {shown}")
    print(f"wrote {out}")
    return 0


def _lora_spec(args: argparse.Namespace) -> tuple[str, str] | None:
    """``--lora NAME=SOURCE`` as (name, source), checked before any model loads; None without it."""
    if args.lora is None:
        return None
    name, separator, source = args.lora.partition("=")
    if not separator or not name or not source:
        raise SystemExit(f"--lora {args.lora!r}: expected NAME=SOURCE")
    if args.trajectories:
        raise SystemExit("--lora calibrates the adapted model's policies, not the trajectory rule")
    return name, source


def _loaded_adapter(model: ResidentModel, name: str, source: str, scale: float) -> tuple[str, float]:
    """Adapter ``name`` read from ``source`` into ``model``, as (name, scale) for the calibration."""
    if model.adapters is None:
        raise SystemExit(f"{model.name} ({type(model.pipeline).__name__}) takes no LoRA adapters")
    try:
        model.adapters.load(name, source)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    return name, scale


def _run_trajectories(
    model: ResidentModel, out: Path, prompts: Sequence[str], steps: int, guidance_scale: float
) -> int:
    """Measure the trajectory rule and write it into ``out``, beside what is there; the pairs it was
    fitted on go beside it (``<out>.trajectories.json``), for the plot."""
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    rule, pairs = calibrate_trajectories(model, prompts, steps=steps, guidance_scale=guidance_scale, log=log)
    existing = load_calibration(out) if out.exists() else model.calibration
    calibration = dataclasses.replace(existing, model=model.name, trajectory_rule=rule)
    calibration.save(out)
    measured = {
        "steps": steps,
        "guidance_scale": guidance_scale,
        "prompts": list(prompts),
        "pairs": [
            {"similarity": pair.similarity, "psnr": {str(k): psnr_to_json(v) for k, v in pair.psnr.items()}}
            for pair in pairs
        ],
    }
    out.with_suffix(".trajectories.json").write_text(json.dumps(measured, indent=1) + "\n")
    shown = ", ".join(f"similarity >= {lowest:g}: {share:.0%}" for lowest, share in rule.points) or "none"
    print(f"trajectory rule over {len(pairs)} pairs (the same prompt: {rule.same_prompt:.0%}): {shown}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
