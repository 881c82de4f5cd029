"""The transformer's training set: each image's normalised latent and its caption's token ids,
encoded once and kept in the work folder."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from shapes import dataset
from shapes.denoiser import token_ids
from shapes.options import Options
from shapes.progress import atomic_save, log
from shapes.vae import normalised_latents

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL


def encode_latents(opts: Options, vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """``latents`` (fp16), ``clip_ids`` and ``t5_ids`` of ``dataset.scenes(opts.images, opts.seed)``."""
    path = opts.work / "latents.pt"
    if path.exists():
        data: dict[str, torch.Tensor] = torch.load(path)
        if len(data["latents"]) == opts.images:
            log(f"latents: reusing {path}")
            return data
    start = time.monotonic()
    all_scenes = dataset.scenes(opts.images, opts.seed)
    latents = []
    for i in range(0, opts.images, 2000):
        latents.append(normalised_latents(vae, dataset.render_batch(all_scenes[i : i + 2000])).half())
    clip_ids, t5_ids = token_ids([s.caption for s in all_scenes])
    data = {"latents": torch.cat(latents), "clip_ids": clip_ids, "t5_ids": t5_ids}
    atomic_save(data, path)
    log(f"latents: {opts.images} images encoded in {time.monotonic() - start:.0f}s")
    return data
