"""Score a shapes model's prompt adherence, and the detector's ceilings.

    python -m shapes.evaluate --model server/assets/shapes-flux

Test prompts are the dataset's own captions drawn from a seed the training set does not use; prompt
``i`` is generated with seed ``i``. An attribute is scored only when the prompt names it, and "all"
means every named attribute is right. The ceilings are the same scores on clean renders of the test
scenes and on the same renders after a round trip through the model's VAE: no generator can beat
the second.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shapes import dataset, detector, text

if TYPE_CHECKING:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

TEST_SEED = 20_251_125
SIZE = dataset.SIZE
STEPS = 20
# The T5 length the model was trained with; see shapes.text.
CALL_KWARGS: dict[str, Any] = {"height": SIZE, "width": SIZE, "max_sequence_length": text.T5_LENGTH}


def load(folder: Path | str) -> FluxPipeline:
    """The pipeline from its folder, as the server loads it, with its default size set to 64 px."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True)
    # Not saved in the config; FluxPipeline's default of 128 latent pixels would make 512x512 images.
    pipe.default_sample_size = SIZE // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_scenes(n: int) -> list[dataset.Scene]:
    return dataset.scenes(n, TEST_SEED)


def generate(
    pipe: FluxPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = STEPS,
    cfg: float = 1.0,
    batch: int = 25,
) -> np.ndarray:
    """(n, 64, 64, 3) uint8. Each image's noise comes from its own seed, so batching does not change it."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        guidance: dict[str, Any] = (
            {"true_cfg_scale": cfg, "negative_prompt": [""] * len(chunk)} if cfg > 1 else {}
        )
        images = pipe(
            prompt=chunk,
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + batch]],
            output_type="np",
            **guidance,
            **CALL_KWARGS,
        ).images
        out.append((np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def adherence(images: np.ndarray, wanted: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Per attribute, the fraction right among images whose prompt names it; "all" over every image."""
    right = dict.fromkeys((*detector.ATTRIBUTES, "all"), 0)
    named = dict.fromkeys((*detector.ATTRIBUTES, "all"), 0)
    for image, want in zip(images, wanted, strict=True):
        scores = detector.score(dict(want), detector.detect(image))
        for name, ok in scores.items():
            right[name] += ok
            named[name] += 1
        right["all"] += all(scores.values())
        named["all"] += 1
    return {name: right[name] / named[name] for name in named if named[name]}


@torch.no_grad()
def vae_round_trip(pipe: FluxPipeline, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    z = pipe.vae.encode(x).latent_dist.mode()
    y = pipe.vae.decode(z).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    rows = -(-len(images) // columns)
    padded = np.concatenate([images, np.zeros((rows * columns - len(images), *images.shape[1:]), np.uint8)])
    return (
        padded.reshape(rows, columns, *images.shape[1:]).swapaxes(1, 2).reshape(rows * images.shape[1], -1, 3)
    )


def evaluate(
    folder: Path, n: int, cfgs: Sequence[float], samples: Path | None
) -> dict[str, dict[str, float]]:
    pipe = load(folder)
    scenes = test_scenes(n)
    prompts = [s.caption for s in scenes]
    wanted = [detector.scene_attributes(s) for s in scenes]
    clean = dataset.render_batch(scenes)
    results = {
        "clean renders": adherence(clean, wanted),
        "VAE round trip": adherence(vae_round_trip(pipe, clean), wanted),
    }
    shown = []
    for cfg in cfgs:
        start = time.perf_counter()
        images = generate(pipe, prompts, range(n), cfg=cfg)
        label = f"{STEPS} steps, " + (f"true CFG {cfg:g}" if cfg > 1 else "no CFG")
        results[label] = {**adherence(images, wanted), "s/img": (time.perf_counter() - start) / n}
        shown.append(images[:16])
    if samples is not None:
        from PIL import Image

        Image.fromarray(grid(np.concatenate(shown), 16)).resize(
            (16 * 128, 128 * len(shown)), Image.Resampling.NEAREST
        ).save(samples)
    return results


def table(results: Mapping[str, Mapping[str, float]]) -> str:
    columns = [*detector.ATTRIBUTES, "all"]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, scores in results.items():
        lines.append(
            f"| {label} | " + " | ".join(f"{scores[c]:.2f}" if c in scores else "-" for c in columns) + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapes.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a FluxPipeline folder")
    parser.add_argument("-n", type=int, default=200, help="test prompts")
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="true CFG scales (1: none)")
    parser.add_argument("--samples", type=Path, help="write a PNG of the first 16 images per setting")
    parser.add_argument("--json", type=Path, help="write the scores as JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = evaluate(args.model, args.n, args.cfg, args.samples)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
