"""The clean latent a velocity implies is the one that was noised."""

from __future__ import annotations

import torch

from shapes.denoiser import clean_estimate
from shapes.vae import LATENT_CHANNELS, LATENT_SIDE


def test_clean_estimate_undoes_the_noising() -> None:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    generator = torch.Generator().manual_seed(0)
    shape = (3, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)
    x0, eps = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    s = torch.tensor([0.1, 0.5, 0.9])
    noisy = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    velocity = FluxPipeline._pack_latents(eps - x0, 3, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)
    assert torch.allclose(clean_estimate(noisy, s, velocity), x0, atol=1e-5)
