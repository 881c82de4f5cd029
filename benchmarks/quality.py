"""Speed against fidelity for each cache method, on the trained shapes model.

    python -m benchmarks.quality            # writes docs/quality.md, docs/quality.png, docs/quality.json

Each method's main knob is swept, with and without true CFG, over the same prompts and seeds. Per
point: the fraction of transformer blocks and attention modules executed, the wall-clock speedup,
PSNR and SSIM of the decoded image against the uncached image for the same seed, and prompt
adherence. Images are generated one at a time (FirstBlockCache decides per batch, a server request
per image), and for each prompt every point runs back to back, so slow drift in a shared machine's
load falls on all points alike.

Presets are then picked from the curve of the model's default guidance: for each PSNR floor, the
fastest point whose pooled PSNR clears it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache_engine import (
    CacheConfig,
    CacheEngine,
    FasterCacheConfig,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
)
from server.presets import taylorseer
from shapes import detector, evaluate

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "server" / "assets" / "shapes-flux"
DOCS = Path(__file__).resolve().parent.parent / "docs"
PRESET_FLOORS = {"fast": 30.0, "balanced": 35.0, "quality": 40.0}


@dataclass(frozen=True)
class Point:
    method: str
    knob: str
    make: Callable[[], CacheConfig | None]


def points() -> list[Point]:
    sweep = [Point("none", "-", lambda: None)]
    for t in (0.05, 0.1, 0.15, 0.2, 0.3):
        sweep.append(
            Point("FirstBlockCache", f"threshold {t:g}", partial(FirstBlockCacheConfig, threshold=t))
        )
    for lite in (False, True):
        for i in (2, 3, 4, 5):
            sweep.append(
                Point(
                    "TaylorSeer lite" if lite else "TaylorSeer",
                    f"interval {i}",
                    partial(taylorseer, i, lite=lite),
                )
            )
    for r in (2, 3, 4):
        pab = partial(
            PyramidAttentionBroadcastConfig,
            spatial_attention_block_skip_range=r,
            spatial_attention_timestep_skip_range=(100, 800),
        )
        sweep.append(Point("PAB", f"spatial range {r}", pab))
    for r in (2, 3, 4):
        sweep.append(
            Point(
                "FasterCache",
                f"spatial range {r}",
                partial(FasterCacheConfig, spatial_attention_block_skip_range=r),
            )
        )
    return sweep


@dataclass
class Result:
    method: str
    knob: str
    cfg: float
    blocks: float  # fraction of block forwards executed
    attention: float  # fraction of attention forwards executed
    speedup: float
    psnr: float  # pooled over images: from the mean squared error
    psnr_median: float
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


def sweep(model: Path, n: int, cfgs: Sequence[float], steps: int, log: Callable[[str], None]) -> list[Result]:
    pipe = evaluate.load(model)
    engine = CacheEngine(pipe.transformer)
    scenes = evaluate.test_scenes(n)
    wanted = [detector.scene_attributes(s) for s in scenes]
    grid = points()
    results = []
    for cfg in cfgs:
        images: list[list[np.ndarray]] = [[] for _ in grid]
        seconds: list[list[float]] = [[] for _ in grid]
        counts = [dict.fromkeys(("bc", "br", "ac", "ar"), 0) for _ in grid]
        for i, scene in enumerate(scenes):
            for j, point in enumerate(grid):
                start = time.perf_counter()
                with engine.session(point.make()) as session:
                    image = evaluate.generate(pipe, [scene.caption], [i], steps=steps, cfg=cfg)[0]
                seconds[j].append(time.perf_counter() - start)
                images[j].append(image)
                stats = session.stats
                counts[j]["bc"] += stats.blocks_computed
                counts[j]["br"] += stats.blocks_reused
                counts[j]["ac"] += stats.attention_computed
                counts[j]["ar"] += stats.attention_reused
            if (i + 1) % 10 == 0:
                log(f"cfg {cfg:g}: {i + 1}/{n} prompts")
        reference = np.stack(images[0]).astype(np.float64) / 255.0
        base_time = statistics.median(seconds[0])
        for j, point in enumerate(grid):
            got = np.stack(images[j]).astype(np.float64) / 255.0
            per_image = ((got - reference) ** 2).mean(axis=(1, 2, 3))
            c = counts[j]
            results.append(
                Result(
                    method=point.method,
                    knob=point.knob,
                    cfg=cfg,
                    blocks=c["bc"] / max(c["bc"] + c["br"], 1),
                    attention=c["ac"] / max(c["ac"] + c["ar"], 1),
                    speedup=base_time / statistics.median(seconds[j]),
                    psnr=psnr(float(per_image.mean())),
                    psnr_median=float(np.median([psnr(float(m)) for m in per_image])),
                    ssim=float(np.mean([ssim(g, r) for g, r in zip(got, reference, strict=True)])),
                    adherence=evaluate.adherence(np.stack(images[j]), wanted),
                    seconds_per_image=statistics.median(seconds[j]),
                )
            )
    return results


def choose_presets(results: Sequence[Result], cfg: float) -> dict[str, Result]:
    """For each floor, the fastest cached point of this guidance whose pooled PSNR clears it."""
    chosen = {}
    for name, floor in PRESET_FLOORS.items():
        eligible = [r for r in results if r.cfg == cfg and r.method != "none" and r.psnr >= floor]
        if eligible:
            chosen[name] = max(eligible, key=lambda r: r.speedup)
    return chosen


def _db(value: float) -> str:
    return "identical" if math.isinf(value) else f"{value:.1f}"


def markdown(results: Sequence[Result], presets: dict[str, Result], meta: dict[str, Any]) -> str:
    lines = [
        "# Cache methods on the shapes model: speed against fidelity",
        "",
        "Generated by `python -m benchmarks.quality`; do not edit by hand.",
        "",
        f"Model `{meta['model']}`, {meta['n']} prompts (seed i for prompt i), {meta['steps']} steps, "
        f"64x64, batch 1, {meta['threads']} torch threads, {meta['when']}. PSNR and SSIM compare the "
        "decoded image with the uncached image for the same prompt and seed; pooled PSNR comes from "
        "the mean squared error over all images. Speedup is the median uncached time per image over the "
        "median cached time, on a machine whose load others share: read it to about +-10%. blocks / "
        "attention: fraction of the transformer's block / attention forwards that actually ran.",
        "",
        "![speedup against PSNR](quality.png)",
        "",
    ]
    for cfg in sorted({r.cfg for r in results}):
        label = "no CFG" if cfg <= 1 else f"true CFG {cfg:g}"
        lines += [
            f"## {label}",
            "",
            "| method | knob | blocks | attention | speedup | PSNR pooled | PSNR median | SSIM | fg | bg | pos | size | shape | all |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            if r.cfg != cfg:
                continue
            a = r.adherence
            lines.append(
                f"| {r.method} | {r.knob} | {r.blocks:.2f} | {r.attention:.2f} | {r.speedup:.2f}x | "
                f"{_db(r.psnr)} | {_db(r.psnr_median)} | {r.ssim:.3f} | {a['fg']:.2f} | {a['bg']:.2f} | "
                f"{a.get('position', math.nan):.2f} | {a.get('size', math.nan):.2f} | {a['shape']:.2f} | "
                f"{a['all']:.2f} |"
            )
        lines.append("")
    lines += [
        f"## Presets (fastest point at each PSNR floor, default guidance {meta['preset_cfg']:g})",
        "",
        "| preset | floor | method | knob | blocks | attention | speedup | PSNR pooled | SSIM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in presets.items():
        lines.append(
            f"| {name} | {PRESET_FLOORS[name]:g} dB | {r.method} | {r.knob} | {r.blocks:.2f} | "
            f"{r.attention:.2f} | {r.speedup:.2f}x | {_db(r.psnr)} | {r.ssim:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Sequence[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = sorted({r.cfg for r in results})
    fig, axes = plt.subplots(1, len(cfgs), figsize=(6 * len(cfgs), 4.5), squeeze=False)
    for ax, cfg in zip(axes[0], cfgs, strict=True):
        rows = [r for r in results if r.cfg == cfg and r.method != "none"]
        for method in dict.fromkeys(r.method for r in rows):
            # In sweep order, so each curve follows its knob.
            mine = [r for r in rows if r.method == method]
            # Identical images have infinite PSNR; draw them at the top of the axis.
            ax.plot([r.speedup for r in mine], [min(r.psnr, 80.0) for r in mine], marker="o", label=method)
        for floor in PRESET_FLOORS.values():
            ax.axhline(floor, color="grey", linewidth=0.5, linestyle="--")
        ax.set_xlabel("wall-clock speedup over uncached")
        ax.set_ylabel("PSNR against uncached (dB, pooled)")
        ax.set_title("no CFG" if cfg <= 1 else f"true CFG {cfg:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(value: Any) -> Any:
    """Strict JSON has no infinity: identical images (infinite PSNR) are written as null."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("-n", type=int, default=50, help="prompts")
    parser.add_argument("--steps", type=int, default=evaluate.STEPS)
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="true CFG scales (1: none)")
    parser.add_argument(
        "--preset-cfg",
        type=float,
        default=3.0,
        help="the guidance the presets are chosen for (shapes-flux's default is true CFG 3)",
    )
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for quality.md / .png / .json")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    results = sweep(args.model, args.n, args.cfg, args.steps, log)
    presets = choose_presets(results, args.preset_cfg)
    meta = {
        "model": args.model.name,
        "n": args.n,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "when": time.strftime("%Y-%m-%d"),
        "preset_cfg": args.preset_cfg,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text(markdown(results, presets, meta))
    plot(results, args.out / "quality.png")
    payload = {
        "meta": meta,
        "results": [asdict(r) for r in results],
        "presets": {k: asdict(v) for k, v in presets.items()},
    }
    (args.out / "quality.json").write_text(json.dumps(_finite(payload), indent=2) + "\n")
    print(markdown(results, presets, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
