"""What the shipped ``outline`` adapter does to ``shapes-flux``: ``python -m benchmarks.adapter_effect``.

Runs ``-n`` prompts (captions of the evaluation's scenes, which neither the base model nor the adapter
trained on) through the server's own generation path (``load_model`` with the adapters it ships, and
``generate``, as a worker runs them) at the served defaults: once without adapters, and once per
``--scales`` with ``loras: [{"name": "outline", "scale": S}]``, each prompt with the same seed. Each image
is scored by:

- the hollow share (``shapes.detector.hollow_share``): how much of the object's area shows the
  background, 0 for a filled shape; an image *reads outlined* at 0.1 or more (the dataset's own outlined
  renders are above it nine times in ten, its filled ones never);
- the shape detector's reading of every attribute the prompt names, so that what the adapter keeps of
  the prompt shows beside what it changes.

A last row is the ceiling: the prompts' own scenes drawn outlined and passed through the model's VAE, which
is as far as any adapter of the transformer can get (thin strokes blur, and their colour with them).

Prints a table; ``--out`` writes ``adapter.png`` (the same prompts, base above adapter) and
``adapter.json`` there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from PIL import Image

from server.models.generation import GenerationParams, generate
from server.models.registry import ResidentModel, load_model
from shapes import dataset, detector, evaluate

if TYPE_CHECKING:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

ADAPTER = "outline"
# An image reads outlined at this hollow share or more.
OUTLINED_AT = 0.1


@dataclass(frozen=True)
class Row:
    label: str
    images: int
    hollow_mean: float
    read_outlined: float
    # The same, among the prompts' large scenes and small ones.
    read_outlined_large: float
    read_outlined_small: float
    # Per attribute the prompts name: the share the detector reads as asked.
    adherence: dict[str, float]


def images_of(model: ResidentModel, prompts: Sequence[str], scale: float | None) -> np.ndarray:
    loras = () if scale is None else ((ADAPTER, scale),)
    out = []
    for seed, prompt in enumerate(prompts):
        params = GenerationParams.from_defaults(model.defaults, prompt=prompt, seed=seed, loras=loras)
        result = generate(model, params)
        assert result.images is not None
        out.append(np.asarray(result.images[0].convert("RGB")))
    return np.stack(out)


def row(label: str, images: np.ndarray, scenes: Sequence[dataset.Scene]) -> Row:
    hollow = np.array([detector.hollow_share(image) for image in images])
    outlined = hollow >= OUTLINED_AT
    large = np.array([scene.size == "large" for scene in scenes])
    adherence = evaluate.adherence(images, [detector.parse_prompt(scene.caption) for scene in scenes])
    return Row(
        label=label,
        images=len(images),
        hollow_mean=float(hollow.mean()),
        read_outlined=float(outlined.mean()),
        read_outlined_large=float(outlined[large].mean()),
        read_outlined_small=float(outlined[~large].mean()),
        adherence={name: round(value, 3) for name, value in adherence.items()},
    )


def table(rows: Sequence[Row]) -> str:
    attributes = [name for name in (*detector.ATTRIBUTES, "all") if name in rows[0].adherence]
    lines = [
        "| run | images | reads outlined | large | small | mean hollow share | "
        + " | ".join(attributes)
        + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in attributes) + " |",
    ]
    for item in rows:
        cells = " | ".join(f"{item.adherence[name]:.2f}" for name in attributes)
        lines.append(
            f"| {item.label} | {item.images} | {item.read_outlined:.0%} | {item.read_outlined_large:.0%} | "
            f"{item.read_outlined_small:.0%} | {item.hollow_mean:.2f} | {cells} |"
        )
    return "\n".join(lines)


def picture(runs: Sequence[np.ndarray], columns: int, path: Path) -> None:
    """The first ``columns`` prompts, one row per run, doubled in size."""
    rows = [np.concatenate(list(images[:columns]), axis=1) for images in runs]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=48, help="prompts (default 48)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0], help="adapter scales")
    parser.add_argument("--out", type=Path, default=None, help="folder for adapter.png and adapter.json")
    args = parser.parse_args(argv)

    from server.models.builtin import BUILTIN_MODELS

    scenes = evaluate.test_scenes(args.n)
    prompts = [scene.caption for scene in scenes]
    with tempfile.TemporaryDirectory() as cache:
        model = load_model("shapes-flux", cache_dir=Path(cache))
        assert model.adapters is not None
        model.adapters.load(ADAPTER, str(BUILTIN_MODELS["shapes-flux"].adapters[ADAPTER]))
        labels = ["no adapter", *(f"outline at {scale:g}" for scale in args.scales)]
        runs = [images_of(model, prompts, None), *(images_of(model, prompts, scale) for scale in args.scales)]
        ceiling = evaluate.vae_round_trip(
            cast("FluxPipeline", model.pipeline), dataset.render_batch(scenes, outlined=True)
        )
    rows = [row(label, images, scenes) for label, images in zip(labels, runs, strict=True)]
    rows.append(row("ceiling: the scenes outlined, through the VAE", ceiling, scenes))
    defaults = model.defaults
    print(
        f"shapes-flux, {args.n} prompts, {defaults.steps} steps, true CFG {defaults.guidance_scale:g}, "
        f"'{ADAPTER}' adapter (reads outlined: hollow share >= {OUTLINED_AT})\n"
    )
    print(table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        picture(runs, 12, args.out / "adapter.png")
        (args.out / "adapter.json").write_text(json.dumps([asdict(item) for item in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
