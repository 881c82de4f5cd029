"""Quality targets on prompts the calibration never saw: does each request keep its floor?

    python -m benchmarks.quality                     # writes docs/targets.md, .png, .json

Three prompt sets (``shapes.prompts.HELD_OUT``: 16 prompts each, their own seeds and phrasings, none
in the calibration) run on the shapes model at 20 and 50 steps, with true CFG 3 and without. Per
prompt: the uncached image, then a ``{"cache": {"target": {"min_psnr": floor}}}`` request at each
floor, resolved exactly as the server resolves it (the calibrated choice, and the request's own guard),
then every policy of a panel: guarded TaylorSeer at each knob, and the fixed schedules and activation
thresholds of the other methods. Every point of a prompt runs back to back, so a shared machine's
drift falls on all alike.

Per set and floor a target is met when its pooled PSNR is at least the floor less 1 dB, no prompt
falls more than 5 dB under the floor, and its speedup is at least that of the fastest panel policy
that meets the same two floors on the same set (read speedups to about +-10%: the machine is shared).
For guarded requests, each answer's own estimated PSNR is set against the measured one.

About 20 minutes on two CPU cores; ``--steps``, ``--cfg``, ``--sets`` and ``--prompts`` run less, and
``--keep`` keeps the settings of the existing ``targets.json`` that are not run again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.naming import Point, db_text, json_safe, setting_name
from server.models.calibration import TAIL_DB
from server.models.registry import ResidentModel, load_model
from server.policy.calibrate import (
    Setting,
    engine_config,
    guarded_policies,
    params_for,
    policy_key,
    run_policy,
    sweep_policies,
)
from server.policy.resolve import Resolved, estimated_psnr, resolve
from server.protocol import CacheTarget
from shapes.prompts import HELD_OUT, PromptSet

DOCS = Path(__file__).resolve().parent.parent / "docs"
FLOORS = (30.0, 35.0, 40.0)
SETTINGS = (Setting(20, 3.0), Setting(20, 1.0), Setting(50, 3.0), Setting(50, 1.0))
# A target's pooled PSNR may sit this far under its floor on prompts it was not calibrated on.
POOLED_TOLERANCE_DB = 1.0

_COMPARED = (
    {"method": "taylorseer", "cache_interval": 3, "disable_cache_before_step": 3},
    {"method": "taylorseer", "cache_interval": 4, "disable_cache_before_step": 3},
    {"method": "taylorseer", "cache_interval": 6, "disable_cache_before_step": 3},
    {"method": "dbcache", "residual_diff_threshold": 0.2, "max_warmup_steps": 2},
    {"method": "dbcache", "residual_diff_threshold": 0.3, "max_warmup_steps": 2},
    {"method": "first_block_cache", "threshold": 0.15},
    {"method": "first_block_cache", "threshold": 0.2},
    {"method": "mag_cache", "threshold": 0.25},
    {"method": "sea_cache", "threshold": 0.25},
    {"method": "sea_cache", "threshold": 1.0},
    {"method": "teacache", "rel_l1_thresh": 0.2},
)


def panel() -> list[dict[str, Any]]:
    """What a target is compared with: guarded TaylorSeer at each knob, and the other methods at the
    knobs of the full sweep that were fastest at some floor."""
    others = [
        policy
        for policy in sweep_policies()
        if any(all(policy.get(k) == v for k, v in wanted.items()) for wanted in _COMPARED)
    ]
    return [*guarded_policies(), *others]


def target_key(floor: float) -> str:
    return f"target {floor:g}"


@dataclass
class Run:
    """One policy on one prompt."""

    key: str
    prompt: int
    mse: float
    seconds: float
    uncached_seconds: float
    # What the policy actually ran (a target's choice, with its guard), in the wire's words.
    policy: dict[str, Any]
    estimated_psnr: float | None = None


@dataclass(frozen=True)
class Summary:
    key: str
    psnr: float
    worst: float
    speedup: float


def psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def summarize(runs: Sequence[Run]) -> Summary:
    return Summary(
        key=runs[0].key,
        psnr=psnr(statistics.fmean(run.mse for run in runs)),
        worst=min(psnr(run.mse) for run in runs),
        speedup=statistics.median(run.uncached_seconds / run.seconds for run in runs),
    )


def meets(summary: Summary, floor: float) -> bool:
    return summary.psnr >= floor - POOLED_TOLERANCE_DB and summary.worst >= floor - TAIL_DB


def _target(model: ResidentModel, floor: float, setting: Setting) -> Resolved:
    spec = CacheTarget.model_validate({"target": {"min_psnr": floor}})
    return resolve(model, spec, setting.steps, setting.guidance_scale)


def measure(
    model: ResidentModel,
    setting: Setting,
    prompts: PromptSet,
    log: Callable[[str], None],
    limit: int | None = None,
) -> list[Run]:
    """Every target and panel policy on the first ``limit`` prompts of the set (default all)."""
    from server.policy.engine_config import describe

    compared = []
    for policy in panel():
        config = engine_config(policy, model.method_values, setting.steps)
        model.cache.check(config)
        compared.append((policy_key(policy), config, None))
    targets = [(floor, _target(model, floor, setting)) for floor in FLOORS]
    chosen = [(target_key(floor), resolved.config, resolved.estimate) for floor, resolved in targets]
    runs: list[Run] = []
    pairs = list(zip(prompts.prompts(), prompts.seeds(), strict=True))[:limit]
    for index, (prompt, seed) in enumerate(pairs):
        params = params_for(model, setting, prompt, seed)
        reference, uncached_seconds, _ = run_policy(model, params, None)
        for key, config, fit in [*chosen, *compared]:
            pixels, seconds, estimate = run_policy(model, params, config)
            run = Run(
                key=key,
                prompt=index,
                mse=float(((pixels - reference) ** 2).mean()),
                seconds=seconds,
                uncached_seconds=uncached_seconds,
                policy=describe(config),
            )
            if fit is not None and estimate is not None:
                run.estimated_psnr = estimated_psnr(fit, estimate)["estimated_psnr"]
            runs.append(run)
        if (index + 1) % 4 == 0:
            log(f"  {setting.key}, set {prompts.name}: {index + 1}/{prompts.count} prompts")
    return runs


@dataclass(frozen=True)
class Check:
    setting: str
    prompt_set: str
    floor: float
    target: Summary
    runs: str  # what the target ran, described
    # The fastest panel policy meeting the same floors on this set (None: none does).
    best: Summary | None

    @property
    def quality_met(self) -> bool:
        return meets(self.target, self.floor)

    @property
    def speed_ratio(self) -> float | None:
        return None if self.best is None else self.target.speedup / self.best.speedup


def checks(results: Mapping[str, Mapping[str, list[Run]]]) -> list[Check]:
    found = []
    for setting, by_set in results.items():
        for set_name, runs in by_set.items():
            keys = list(dict.fromkeys(run.key for run in runs))
            summaries = {key: summarize([run for run in runs if run.key == key]) for key in keys}
            for floor in FLOORS:
                target = summaries[target_key(floor)]
                meeting = [
                    s for key, s in summaries.items() if not key.startswith("target") and meets(s, floor)
                ]
                best = max(meeting, key=lambda s: s.speedup, default=None)
                ran = next(run.policy for run in runs if run.key == target_key(floor))
                found.append(Check(setting, set_name, floor, target, _described(ran), best))
    return found


def _described(policy: Mapping[str, Any]) -> str:
    point = Point(policy)
    budget = policy.get("error_budget")
    return f"{point.method} {point.knob}" + ("" if budget is None else f", budget {budget:g}")


def _key_name(key: str) -> str:
    if key.startswith("target"):
        return key
    return _described(json.loads(key))


def estimate_tracking(results: Mapping[str, Mapping[str, list[Run]]]) -> dict[str, float | int]:
    """Across every guarded target run: how the answer's own estimated PSNR follows the measured one."""
    pairs = [
        (run.estimated_psnr, psnr(run.mse))
        for by_set in results.values()
        for runs in by_set.values()
        for run in runs
        if run.estimated_psnr is not None and run.mse > 0
    ]
    if len(pairs) < 3:
        return {"runs": len(pairs)}
    estimated = np.array([p[0] for p in pairs])
    measured = np.array([p[1] for p in pairs])
    return {
        "runs": len(pairs),
        "correlation": round(float(np.corrcoef(estimated, measured)[0, 1]), 3),
        "mean_error_db": round(float(np.mean(estimated - measured)), 2),
        "sd_error_db": round(float(np.std(estimated - measured)), 2),
    }


def markdown(results: Mapping[str, Mapping[str, list[Run]]], meta: Mapping[str, Any]) -> str:
    found = checks(results)
    tracking = estimate_tracking(results)
    quality = sum(check.quality_met for check in found)
    lines = [
        "# Quality targets on prompts the calibration never saw",
        "",
        "Generated by `python -m benchmarks.quality`; do not edit by hand.",
        "",
        f"Model `{meta['model']}`, calibrated on {meta['calibration_prompts']} prompts; checked on "
        f"{len(HELD_OUT)} other sets of {HELD_OUT[0].count} prompts (`shapes.prompts.HELD_OUT`: their own "
        f"seeds and phrasings), {meta['threads']} torch threads, {meta['when']}. PSNR compares each image "
        "with the uncached image of the same prompt and seed; pooled comes from the mean squared error "
        "over the set, worst is the prompt hurt most. Speedup is the median over prompts of each "
        "prompt's uncached time over its cached time (read it to about +-10%: the machine is shared).",
        "",
        f"A target at floor F is met on a set when its pooled PSNR is at least F - "
        f"{POOLED_TOLERANCE_DB:g} dB and no prompt falls under F - {TAIL_DB:g} dB. **Quality met: "
        f"{quality} of {len(found)}.** Best here is the fastest policy of the panel (guarded TaylorSeer at "
        "each knob, fixed TaylorSeer schedules, DBCache, FirstBlockCache, MagCache, SeaCache, TeaCache) "
        "that meets the same two floors on the same set; speed ratio is the target's speedup over it.",
        "",
        "![per-prompt PSNR of each target](targets.png)",
        "",
        "| setting | set | floor | target runs | pooled | worst | speedup | quality met | best here "
        "| its speedup | speed ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for check in found:
        best = check.best
        ratio = check.speed_ratio
        lines.append(
            f"| {check.setting} | {check.prompt_set} | {check.floor:g} dB | {check.runs} | "
            f"{db_text(check.target.psnr)} | {db_text(check.target.worst)} | {check.target.speedup:.2f}x | "
            f"{'yes' if check.quality_met else '**no**'} | "
            f"{'-' if best is None else _key_name(best.key)} | "
            f"{'-' if best is None else f'{best.speedup:.2f}x'} | {'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    lines += [
        "",
        "## Each answer's own estimate",
        "",
        "A guarded request's answer carries `cache_policy.target.estimated_psnr`: its own estimate of "
        "its error, mapped to PSNR by the calibration's line. Over "
        f"{tracking['runs']} guarded target runs here: correlation with the measured PSNR "
        f"{tracking.get('correlation', math.nan):.2f}, estimate minus measured "
        f"{tracking.get('mean_error_db', math.nan):+.1f} dB on average, standard deviation "
        f"{tracking.get('sd_error_db', math.nan):.1f} dB.",
        "",
        "## Every policy, per setting and set",
        "",
        "| setting | set | policy | pooled | worst | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for setting, by_set in results.items():
        for set_name, runs in by_set.items():
            for key in dict.fromkeys(run.key for run in runs):
                s = summarize([run for run in runs if run.key == key])
                lines.append(
                    f"| {setting} | {set_name} | {_key_name(key)} | {db_text(s.psnr)} | {db_text(s.worst)} | "
                    f"{s.speedup:.2f}x |"
                )
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Mapping[str, list[Run]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results)
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(4.2 * (len(settings) + 1), 4.4), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=False):
        for f_index, floor in enumerate(FLOORS):
            for s_index, (set_name, runs) in enumerate(results[setting].items()):
                values = [min(psnr(run.mse), 60.0) for run in runs if run.key == target_key(floor)]
                x = f_index + (s_index - 1) * 0.22 + np.linspace(-0.06, 0.06, len(values))
                ax.scatter(x, values, s=9, label=set_name if f_index == 0 else None, color=f"C{s_index}")
            ax.hlines([floor, floor - TAIL_DB], f_index - 0.4, f_index + 0.4, colors=["black", "red"], lw=1)
        ax.set_xticks(range(len(FLOORS)), [f"target {f:g}" for f in FLOORS])
        ax.set_ylabel("per-prompt PSNR (dB)")
        ax.set_title(setting)
        ax.set_ylim(15, 61)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[0][-1]
    pairs = [
        (run.estimated_psnr, min(psnr(run.mse), 60.0))
        for by_set in results.values()
        for runs in by_set.values()
        for run in runs
        if run.estimated_psnr is not None
    ]
    if pairs:
        ax.scatter([p[0] for p in pairs], [p[1] for p in pairs], s=6, alpha=0.5)
        ax.plot([20, 60], [20, 60], color="grey", lw=0.8)
    ax.set_xlabel("the answer's estimated PSNR (dB)")
    ax.set_ylabel("measured PSNR (dB)")
    ax.set_title("estimate against measurement")
    ax.grid(alpha=0.3)
    fig.suptitle("Each target's prompts: black line the floor, red the floor less 5 dB", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save(results: Mapping[str, Mapping[str, list[Run]]], meta: Mapping[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": dict(meta),
        "results": {
            setting: {name: [asdict(run) for run in runs] for name, runs in by_set.items()}
            for setting, by_set in results.items()
        },
        "checks": [
            {
                **asdict(check),
                "quality_met": check.quality_met,
                "speed_ratio": check.speed_ratio,
            }
            for check in checks(results)
        ],
        "estimate": estimate_tracking(results),
    }
    (out / "targets.json").write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    (out / "targets.md").write_text(markdown(results, meta))
    plot(results, out / "targets.png")


def read(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, list[Run]]]]:
    data = json.loads(path.read_text())
    results = {
        setting: {name: [Run(**run) for run in runs] for name, runs in by_set.items()}
        for setting, by_set in data["results"].items()
    }
    return data["meta"], results


def run(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    json_path = args.out / "targets.json"
    if args.results is not None:
        meta, results = read(args.results)
    else:
        import torch

        model = load_model(str(args.model), cache_dir=args.cache_dir)
        settings = [s for s in SETTINGS if s.steps in args.steps and s.guidance_scale in args.cfg]
        meta = {
            "model": model.name,
            "calibration_prompts": model.calibration.prompts,
            "threads": torch.get_num_threads(),
            "when": time.strftime("%Y-%m-%d"),
        }
        results = {}
        if args.keep and json_path.exists():
            _, results = read(json_path)
        for setting in settings:
            label = setting_name(setting.steps, setting.guidance_scale)
            results[label] = {}
            for prompts in HELD_OUT[: args.sets]:
                results[label][prompts.name] = measure(model, setting, prompts, log, args.prompts)
            save(results, meta, args.out)
    save(results, meta, args.out)
    print(markdown(results, meta))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="shapes-flux", help="a built-in name or a folder (default shapes-flux)"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(".ditcache"))
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--cfg", type=float, nargs="+", default=[3.0, 1.0])
    parser.add_argument("--sets", type=int, default=len(HELD_OUT), help="how many held-out sets to run")
    parser.add_argument(
        "--prompts", type=int, default=None, help="the first N prompts of each set (default all)"
    )
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for targets.md / .png / .json")
    parser.add_argument("--results", type=Path, help="a targets.json written before: render it again")
    parser.add_argument(
        "--keep", action="store_true", help="keep the settings of the existing targets.json not run now"
    )
