"""Edits a person can see, on the trained shapes model: ``python -m benchmarks.edits``.

Draws ``-n`` shape scenes (the dataset's renderer, a seed no training or test set uses) and, for each,
asks the served ``shapes-flux`` model, through the server's own generation path (``load_model`` and
``generate``, as a worker runs them), for:

- an image-to-image edit: the scene's caption with another foreground colour, at ``--strength``
  (0.8), scored by the project's shape detector: does it read the asked colour, and does it still read
  the scene's shape, background and position;
- an inpainting: the same prompt, with the scene's object (its box, widened by ``--margin`` pixels) as
  the mask, at strength 1; scored by the colour read, and by the PSNR outside the mask against the
  image it started from.

Prints a table per task and, with ``--out``, writes ``edits.png``: each scene beside its image-to-image
edit and its inpainting (``docs/edits.md`` shows a recorded run).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from server.models.generation import GenerationParams, generate
from server.models.registry import ResidentModel, load_model
from shapes import dataset, detector

# No training or test set draws from this seed.
EDIT_SEED = 20_261_206
DOCS = Path(__file__).resolve().parent.parent / "docs"


@dataclass(frozen=True)
class Edit:
    scene: dataset.Scene
    prompt: str
    asked: str
    found: detector.Detection
    # Inpainting: PSNR outside the mask against the source; None for image-to-image.
    outside_psnr: float | None
    image: np.ndarray


def edit_prompt(scene: dataset.Scene, colour: str) -> str:
    """The scene's full caption, with ``colour`` for its object."""
    return dataset.Scene(**{**scene.__dict__, "fg": colour, "say_size": True, "say_position": True}).caption


def other_colour(scene: dataset.Scene, rng: np.random.Generator) -> str:
    choices = [name for name in dataset.COLOUR_NAMES if name not in (scene.fg, scene.bg)]
    return choices[int(rng.integers(len(choices)))]


def object_mask(scene: dataset.Scene, margin: float) -> np.ndarray:
    """True where the scene's object is, within ``margin`` pixels of its bounding square."""
    reach = scene.r * 1.2 + margin
    ys, xs = np.mgrid[0 : dataset.SIZE, 0 : dataset.SIZE] + 0.5
    return (np.abs(xs - scene.cx) <= reach) & (np.abs(ys - scene.cy) <= reach)


def alpha_mask(inside: np.ndarray) -> Image.Image:
    """OpenAI's convention, as a request carries it: transparent where to change."""
    alpha = np.where(inside, 0, 255).astype(np.uint8)
    rgba = np.zeros((*inside.shape, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    return Image.fromarray(rgba, "RGBA")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run(model: ResidentModel, n: int, strength: float, margin: float, steps: int) -> dict[str, list[Edit]]:
    rng = np.random.default_rng(EDIT_SEED)
    scenes = dataset.scenes(n, EDIT_SEED)
    edits: dict[str, list[Edit]] = {"image_to_image": [], "inpainting": []}
    for index, scene in enumerate(scenes):
        source = dataset.render(scene)
        colour = other_colour(scene, rng)
        prompt = edit_prompt(scene, colour)
        image = Image.fromarray(source, "RGB")
        inside = object_mask(scene, margin)
        # The pipelines' mask, as the server makes it from the request's alpha: white where to paint.
        painted = Image.fromarray(np.where(inside, 255, 0).astype(np.uint8), "L")
        for task, fields in (
            ("image_to_image", {"image": image, "strength": strength}),
            ("inpainting", {"image": image, "mask": painted, "strength": 1.0}),
        ):
            params = GenerationParams.from_defaults(
                model.defaults, prompt=prompt, steps=steps, seed=index, **fields
            )
            result = generate(model, params)
            assert result.images is not None
            out = np.asarray(result.images[0].convert("RGB"))
            outside = psnr(out[~inside], source[~inside]) if task == "inpainting" else None
            edits[task].append(Edit(scene, prompt, colour, detector.detect(out), outside, out))
    return edits


def summary(task: str, edits: Sequence[Edit]) -> str:
    colour = sum(edit.found.fg == edit.asked for edit in edits) / len(edits)
    kept = {
        name: sum(edit.found.get(name) == getattr(edit.scene, name) for edit in edits) / len(edits)
        for name in ("bg", "shape", "position")
    }
    lines = [
        f"| {task} | {len(edits)} | {colour:.0%} | {kept['bg']:.0%} | {kept['shape']:.0%} | {kept['position']:.0%} |"
    ]
    psnrs = [edit.outside_psnr for edit in edits if edit.outside_psnr is not None]
    if psnrs:
        identical = sum(not math.isfinite(value) for value in psnrs)
        worst = min(psnrs)
        shown = "inf (identical)" if not math.isfinite(worst) else f"{worst:.1f} dB"
        lines.append(
            f"| PSNR outside the mask: worst {shown}, {identical} of {len(psnrs)} identical | | | | | |"
        )
    return "\n".join(lines)


def table(edits: dict[str, list[Edit]]) -> str:
    header = "| task | edits | asked colour read | background kept | shape kept | position kept |\n"
    header += "| --- | ---: | ---: | ---: | ---: | ---: |\n"
    return header + "\n".join(summary(task, items) for task, items in edits.items())


def picture(edits: dict[str, list[Edit]], columns: int, path: Path) -> None:
    """Each scene, its image-to-image edit and its inpainting, side by side, ``columns`` scenes a row."""
    triples = [
        np.concatenate([dataset.render(a.scene), a.image, b.image], axis=1)
        for a, b in zip(edits["image_to_image"], edits["inpainting"], strict=True)
    ]
    gap = np.full((dataset.SIZE, 4, 3), 255, dtype=np.uint8)
    rows = []
    for start in range(0, len(triples), columns):
        row = triples[start : start + columns]
        row += [np.full_like(triples[0], 255)] * (columns - len(row))
        rows.append(
            np.concatenate(
                [item for pair in zip(row, [gap] * len(row), strict=True) for item in pair], axis=1
            )
        )
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (rows[0].shape[1] * 2, len(rows) * dataset.SIZE * 2), Image.Resampling.NEAREST
    ).save(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=24, help="scenes (default 24)")
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--margin", type=float, default=3.0, help="pixels around the object's box")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="folder for edits.png")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as cache:
        model = load_model("shapes-flux", cache_dir=Path(cache))
        edits = run(model, args.n, args.strength, args.margin, args.steps)
    text = table(edits)
    print(f"shapes-flux, {args.steps} steps, image-to-image at strength {args.strength}, inpainting at 1.0\n")
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        picture(edits, 4, args.out / "edits.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
