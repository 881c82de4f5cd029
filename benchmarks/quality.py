"""Speed against fidelity for each cache method, on the trained shapes model.

    python -m benchmarks.quality            # the targets on held-out prompts (benchmarks/held_out.py):
                                            # docs/targets.md, docs/targets.png, docs/targets.json
    python -m benchmarks.quality --sweep    # every method's knobs: docs/quality.md, .png, .json

Every policy of the calibration sweep (``server.policy.calibrate.sweep_policies``: each method's main knobs;
MagCache and TeaCache on the values fitted for the model, read from its shipped calibration) runs over
the same prompts and seeds, at each step count, with and without true CFG. Per point: the fraction of
transformer blocks and attention modules executed, the wall-clock speedup, PSNR (pooled, median and
worst prompt) and SSIM of the decoded image against the uncached image for the same seed, and prompt
adherence. Images are generated one at a time (FirstBlockCache decides per batch, a server request per
image), and for each prompt every point runs back to back, so slow drift in a shared machine's load
falls on all points alike.

What a quality target chooses, and whether it holds on prompts its calibration never saw, is the
other mode's (``benchmarks/held_out.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.naming import Point, db_text, json_safe, setting_name
from cache_engine import CacheEngine
from server.models.calibration import Calibration, load_calibration, psnr_from_json
from server.models.registry import CALIBRATION_FILE
from server.policy.calibrate import sweep_policies
from server.policy.resolve import PRESET_FLOORS
from shapes import detector, evaluate

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "server" / "assets" / "shapes-flux"
DOCS = Path(__file__).resolve().parent.parent / "docs"
# A target's floors: the presets' (30, 35 and 40 dB).
FLOORS = tuple(PRESET_FLOORS.values())


def points() -> list[Point]:
    return [Point({"method": "none"}), *(Point(policy) for policy in sweep_policies())]


def model_calibration(model: Path) -> Calibration | None:
    path = model / CALIBRATION_FILE
    return load_calibration(path) if path.exists() else None


@dataclass
class Result:
    method: str
    knob: str
    policy: dict[str, Any]
    steps: int
    cfg: float
    blocks: float  # fraction of block forwards executed
    attention: float  # fraction of attention forwards executed
    speedup: float
    psnr: float  # pooled over images: from the mean squared error
    psnr_median: float
    psnr_worst: float
    ssim: float
    adherence: dict[str, float] = field(default_factory=dict)
    seconds_per_image: float = 0.0


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / mse) if mse > 0 else math.inf


def _gaussian_blur(x: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian over the two spatial axes of (h, w, c), valid region only."""
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    rows = sum(taps[i] * x[i : x.shape[0] - 2 * radius + i] for i in range(len(taps)))
    return sum(taps[i] * rows[:, i : x.shape[1] - 2 * radius + i] for i in range(len(taps)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two images in [0, 1] (Gaussian window 11, sigma 1.5, per channel, averaged)."""
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _gaussian_blur(a), _gaussian_blur(b)
    var_a = _gaussian_blur(a * a) - mu_a**2
    var_b = _gaussian_blur(b * b) - mu_b**2
    cov = _gaussian_blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def sweep(
    model: Path,
    n: int,
    cfgs: Sequence[float],
    steps_list: Sequence[int],
    method_values: Mapping[str, Mapping[str, Any]],
    log: Callable[[str], None],
) -> list[Result]:
    pipe = evaluate.load(model)
    engine = CacheEngine(pipe.transformer)
    scenes = evaluate.test_scenes(n)
    wanted = [detector.scene_attributes(s) for s in scenes]
    results = []
    for steps in steps_list:
        grid = []
        for point in points():
            try:
                config = point.make(method_values, steps)
                engine.check(config)
            except ValueError as exc:  # MagCache without fitted ratios: the model was not calibrated
                log(f"skipped {point.method} {point.knob}: {exc}")
                continue
            grid.append((point, config))
        for cfg in cfgs:
            images: list[list[np.ndarray]] = [[] for _ in grid]
            seconds: list[list[float]] = [[] for _ in grid]
            counts = [dict.fromkeys(("bc", "br", "ac", "ar"), 0) for _ in grid]
            for i, scene in enumerate(scenes):
                for j, (_, config) in enumerate(grid):
                    start = time.perf_counter()
                    with engine.session(config) as session:
                        image = evaluate.generate(pipe, [scene.caption], [i], steps=steps, cfg=cfg)[0]
                    seconds[j].append(time.perf_counter() - start)
                    images[j].append(image)
                    stats = session.stats
                    counts[j]["bc"] += stats.blocks_computed
                    counts[j]["br"] += stats.blocks_reused
                    counts[j]["ac"] += stats.attention_computed
                    counts[j]["ar"] += stats.attention_reused
                if (i + 1) % 5 == 0:
                    log(f"{steps} steps, cfg {cfg:g}: {i + 1}/{n} prompts")
            reference = np.stack(images[0]).astype(np.float64) / 255.0
            base_time = statistics.median(seconds[0])
            for j, (point, _) in enumerate(grid):
                got = np.stack(images[j]).astype(np.float64) / 255.0
                per_image = ((got - reference) ** 2).mean(axis=(1, 2, 3))
                c = counts[j]
                results.append(
                    Result(
                        method=point.method,
                        knob=point.knob,
                        policy=dict(point.policy),
                        steps=steps,
                        cfg=cfg,
                        blocks=c["bc"] / max(c["bc"] + c["br"], 1),
                        attention=c["ac"] / max(c["ac"] + c["ar"], 1),
                        speedup=base_time / statistics.median(seconds[j]),
                        psnr=psnr(float(per_image.mean())),
                        psnr_median=float(np.median([psnr(float(m)) for m in per_image])),
                        psnr_worst=min(psnr(float(m)) for m in per_image),
                        ssim=float(np.mean([ssim(g, r) for g, r in zip(got, reference, strict=True)])),
                        adherence=evaluate.adherence(np.stack(images[j]), wanted),
                        seconds_per_image=statistics.median(seconds[j]),
                    )
                )
    return results


def markdown(results: Sequence[Result], meta: dict[str, Any]) -> str:
    lines = [
        "# Cache methods on the shapes model: speed against fidelity",
        "",
        "Generated by `python -m benchmarks.quality --sweep`; do not edit by hand.",
        "",
        f"Model `{meta['model']}`, {meta['n']} prompts (seed i for prompt i), {meta['steps']} steps, "
        f"64x64, batch 1, {meta['threads']} torch threads, {meta['when']}. PSNR and SSIM compare the "
        "decoded image with the uncached image for the same prompt and seed; pooled PSNR comes from "
        "the mean squared error over all images, worst is the prompt hurt most. Speedup is the median "
        "uncached time per image over the median cached time, on a machine whose load others share: "
        "read it to about +-10%. blocks / attention: fraction of the transformer's block / attention "
        "forwards that actually ran. MagCache and TeaCache run on the magnitude ratios and polynomial "
        "fitted for this model by `ditcache calibrate` (its `calibration.json`).",
        "",
        "![speedup against PSNR](quality.png)",
        "",
        "What a quality target runs, and whether it holds on prompts its calibration never saw: "
        "[targets.md](targets.md).",
        "",
    ]
    for steps, cfg in dict.fromkeys((r.steps, r.cfg) for r in results):
        lines += [
            f"## {setting_name(steps, cfg)}",
            "",
            "| method | knob | blocks | attention | speedup | PSNR pooled | PSNR median | worst | SSIM "
            "| fg | bg | pos | size | shape | all |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            if (r.steps, r.cfg) != (steps, cfg):
                continue
            a = r.adherence
            lines.append(
                f"| {r.method} | {r.knob} | {r.blocks:.2f} | {r.attention:.2f} | {r.speedup:.2f}x | "
                f"{db_text(r.psnr)} | {db_text(r.psnr_median)} | {db_text(r.psnr_worst)} | {r.ssim:.3f} | "
                f"{a['fg']:.2f} | {a['bg']:.2f} | {a.get('position', math.nan):.2f} | "
                f"{a.get('size', math.nan):.2f} | {a['shape']:.2f} | {a['all']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: Sequence[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys((r.steps, r.cfg) for r in results))
    columns = min(2, len(settings))
    rows_count = math.ceil(len(settings) / columns)
    fig, axes = plt.subplots(rows_count, columns, figsize=(6.5 * columns, 4.8 * rows_count), squeeze=False)
    for ax, (steps, cfg) in zip(axes.flat, settings, strict=False):
        rows = [r for r in results if (r.steps, r.cfg) == (steps, cfg) and r.method != "none"]
        for method in dict.fromkeys(r.method for r in rows):
            # By speed, so each method's line runs from faithful to fast.
            mine = sorted((r for r in rows if r.method == method), key=lambda r: r.speedup)
            # Identical images have infinite PSNR; draw them at the top of the axis.
            ax.plot([r.speedup for r in mine], [min(r.psnr, 60.0) for r in mine], marker="o", label=method)
        for floor in FLOORS:
            ax.axhline(floor, color="grey", linewidth=0.5, linestyle="--")
        ax.set_xlabel("wall-clock speedup over uncached")
        ax.set_ylabel("PSNR against uncached (dB, pooled)")
        ax.set_title(setting_name(steps, cfg))
        ax.set_ylim(15, 62)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(settings) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_results(path: Path) -> tuple[dict[str, Any], list[Result]]:
    """The meta and results of a quality.json (null PSNRs read back as identical images)."""
    data = json.loads(path.read_text())
    results = [
        Result(**{**row, **{k: psnr_from_json(row[k]) for k in ("psnr", "psnr_median", "psnr_worst")}})
        for row in data["results"]
    ]
    return data["meta"], results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--sweep" not in argv:
        from benchmarks import held_out

        checking = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=held_out.__doc__)
        held_out.add_arguments(checking)
        return held_out.run(checking.parse_args(argv))
    argv.remove("--sweep")
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality --sweep", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("-n", type=int, default=24, help="prompts (default 24)")
    parser.add_argument("--steps", type=int, nargs="+", default=[evaluate.STEPS, 50], help="step counts")
    parser.add_argument("--cfg", type=float, nargs="+", default=[3.0, 1.0], help="true CFG scales (1: none)")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for quality.md / .png / .json")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="a quality.json written before: write its tables and plot again instead of sweeping",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    calibration = model_calibration(args.model)
    if args.results is not None:
        meta, results = read_results(args.results)
    else:
        method_values = calibration.method_values if calibration else {}
        results = sweep(args.model, args.n, args.cfg, args.steps, method_values, log)
        meta = {
            "model": args.model.name,
            "n": args.n,
            "steps": " and ".join(str(s) for s in args.steps),
            "threads": torch.get_num_threads(),
            "when": time.strftime("%Y-%m-%d"),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text(markdown(results, meta))
    plot(results, args.out / "quality.png")
    payload = {"meta": meta, "results": [asdict(r) for r in results]}
    (args.out / "quality.json").write_text(json.dumps(json_safe(payload), indent=2) + "\n")
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
