"""A training run's settings, and the defaults of the recipe with the reasons for them.

The measurements behind each default are in docs/shapes-model.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The VAE and decoder stages' batch.
BATCH = 32
# The transformer's recipe. A smaller batch (16), a higher peak rate (3e-3) and noise levels shifted
# up (mean 0.5) reach a lower loss, but the model then places every object in the centre (position
# 0.19 against 0.99 with these values, on the same VAE and latents).
TRANSFORMER_BATCH = 32
TRANSFORMER_LR = 1e-3
# Noise levels s ~ sigmoid(N(NOISE_MEAN, 1)), SD3's logit-normal.
NOISE_MEAN = 0.0
# Weight of the caption probe's loss (shapes.probe). The pooled CLIP embedding is what the
# transformer's AdaLN modulation sees, and the diffusion loss alone barely separates the shape words
# in it (circle against square: cosine 0.98 after a full run without the probe), so that circles and
# squares come out alike.
CAPTION_LOSS = 0.1
# Weight of the shape critic's loss (shapes.critic). A circle and a square of one size differ in a few
# corner pixels, so the flow-matching loss barely tells them apart; the critic's cross-entropy on the
# transformer's estimate of the clean latent does (shape 0.64 against 0.47 over the same 2,000 steps
# without it).
SHAPE_LOSS = 0.1
# ...but only over the last part of the transformer's time. A model that cannot draw yet finds
# textures the critic reads as shapes an easier target than drawing, and never learns position (0.44
# with the critic on from the first step); on a model that draws, the critic sharpens what is drawn.
CRITIC_FROM = 0.7
CRITIC_STEPS = 800


@dataclass(frozen=True)
class Options:
    out: Path
    work: Path
    minutes: float
    seed: int = 0
    images: int = 48_000
    vae_share: float = 0.16
    decoder_share: float = 0.2
    checkpoint_minutes: float = 4.0
    # Caps for smoke tests; the budget decides otherwise.
    vae_steps: int | None = None
    steps: int | None = None
    log_every: int = 50
    batch: int = BATCH
    transformer_batch: int = TRANSFORMER_BATCH
    lr: float = TRANSFORMER_LR
    noise_mean: float = NOISE_MEAN
    caption_loss: float = CAPTION_LOSS
    shape_loss: float = SHAPE_LOSS
    critic_from: float = CRITIC_FROM
    critic_steps: int = CRITIC_STEPS
    compile: bool = True
