"""Which text embedding tells a shapes model what shape to draw.

    python -m shapes.conditioning --model server/assets/shapes-flux --image templates.png

FluxPipeline conditions the transformer twice: CLIP's pooled embedding modulates every block
(AdaLN), and T5's token embeddings join the image tokens in attention. For captions that differ only
in the shape word, this measures:

* the cosine between the pooled embeddings;
* the template: the model's prediction of the clean image from pure noise (noise level 0.98),
  averaged over 16 noise draws, i.e. the mean image the model has learnt for the caption;
* the same distance between the data's own templates: the mean latent of 64 renders of each caption
  (position and size jittered as in training), which is what a perfect model's template would be;
* for every pair of shapes, how much of the change between the two templates follows the pooled
  embedding alone and how much follows the T5 embeddings alone (the other held at the first shape).

A model that draws every shape from its word has four distinct templates; the pooled and T5 shares
say which path carries the word.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from shapes import dataset, evaluate
from shapes.denoiser import clean_estimate
from shapes.vae import normalised_latents

if TYPE_CHECKING:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

CAPTION = "a large red {shape} in the center on a blue background"
NOISE_LEVEL = 0.98
DRAWS = 16


@dataclass(frozen=True)
class Report:
    pooled_cosine: dict[tuple[str, str], float]
    # Template distance, RMS over latent elements, for the model and for the data; and the shares
    # of the model's distance carried by each path.
    template_distance: dict[tuple[str, str], float]
    data_distance: dict[tuple[str, str], float]
    pooled_share: dict[tuple[str, str], float]
    t5_share: dict[tuple[str, str], float]
    templates: dict[str, torch.Tensor]


@torch.no_grad()
def template(pipe: FluxPipeline, t5: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The mean predicted clean latent (normalised, unpacked) from pure noise, for one conditioning."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    n, channels, side, _ = noise.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", noise.dtype)
    velocity = pipe.transformer(
        hidden_states=FluxPipeline._pack_latents(noise, n, channels, side, side),
        timestep=torch.full((n,), NOISE_LEVEL),
        pooled_projections=pooled.expand(n, -1),
        encoder_hidden_states=t5.expand(n, -1, -1),
        txt_ids=torch.zeros(t5.shape[1], 3),
        img_ids=image_ids,
        return_dict=False,
    )[0]
    return clean_estimate(noise, torch.full((n,), NOISE_LEVEL), velocity).mean(0)


@torch.no_grad()
def data_template(pipe: FluxPipeline, shape: str, draws: int = 64, seed: int = 0) -> torch.Tensor:
    """The mean normalised latent of ``draws`` renders of the caption, jittered as in training."""
    rng = np.random.default_rng([seed, dataset.SHAPES.index(shape)])
    scene = {"shape": shape, "fg": "red", "bg": "blue", "size": "large", "position": "center"}
    scenes = [dataset.jittered_scene(rng, **scene) for _ in range(draws)]
    return normalised_latents(pipe.vae, dataset.render_batch(scenes)).mean(0)


def measure(pipe: FluxPipeline, seed: int = 0) -> Report:
    captions = [CAPTION.format(shape=shape) for shape in dataset.SHAPES]
    with torch.no_grad():
        t5, pooled, _ = pipe.encode_prompt(
            captions, captions, max_sequence_length=evaluate.CALL_KWARGS["max_sequence_length"]
        )
    side = evaluate.SIZE // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels // 4
    noise = torch.randn(DRAWS, channels, side, side, generator=torch.Generator().manual_seed(seed))
    index = {shape: i for i, shape in enumerate(dataset.SHAPES)}

    def made(t5_shape: str, pooled_shape: str) -> torch.Tensor:
        return template(pipe, t5[index[t5_shape]][None], pooled[index[pooled_shape]][None], noise)

    own = {shape: made(shape, shape) for shape in dataset.SHAPES}
    data = {shape: data_template(pipe, shape) for shape in dataset.SHAPES}
    unit = torch.nn.functional.normalize(pooled, dim=-1)
    cosine, distance, data_distance, pooled_share, t5_share = {}, {}, {}, {}, {}
    for a, b in itertools.combinations(dataset.SHAPES, 2):
        change = own[b] - own[a]
        norm2 = change.pow(2).sum().clamp_min(1e-12)
        cosine[a, b] = (unit[index[a]] @ unit[index[b]]).item()
        distance[a, b] = change.pow(2).mean().sqrt().item()
        data_distance[a, b] = (data[b] - data[a]).pow(2).mean().sqrt().item()
        pooled_share[a, b] = ((made(a, b) - own[a]) * change).sum().div(norm2).item()
        t5_share[a, b] = ((made(b, a) - own[a]) * change).sum().div(norm2).item()
    return Report(cosine, distance, data_distance, pooled_share, t5_share, own)


@torch.no_grad()
def template_image(pipe: FluxPipeline, report: Report) -> np.ndarray:
    """The four templates decoded side by side, uint8 (64, 256, 3)."""
    vae = pipe.vae
    latents = torch.stack([report.templates[shape] for shape in dataset.SHAPES])
    pixels = vae.decode(latents / vae.config["scaling_factor"] + vae.config["shift_factor"]).sample
    images = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return np.concatenate(list(images), axis=1)


def table(report: Report) -> str:
    lines = [
        "| shapes | pooled cosine | template distance | in the data | pooled share | T5 share |",
        "|---|---|---|---|---|---|",
    ]
    for pair in report.pooled_cosine:
        lines.append(
            f"| {pair[0]} / {pair[1]} | {report.pooled_cosine[pair]:.3f} | {report.template_distance[pair]:.3f}"
            f" | {report.data_distance[pair]:.3f} | {report.pooled_share[pair]:.2f} | {report.t5_share[pair]:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shapes.conditioning", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, required=True, help="a FluxPipeline folder")
    parser.add_argument("--image", type=Path, help="write the four templates, decoded, as a PNG")
    args = parser.parse_args(argv)
    pipe = evaluate.load(args.model)
    report = measure(pipe)
    print(f"{CAPTION}, noise level {NOISE_LEVEL}, {DRAWS} draws\n")
    print(table(report))
    if args.image is not None:
        from PIL import Image

        Image.fromarray(template_image(pipe, report)).resize((4 * 128, 128), Image.Resampling.NEAREST).save(
            args.image
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
