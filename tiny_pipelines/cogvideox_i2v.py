"""Tiny CogVideoXImageToVideoPipeline (CogVideoX-5b-I2V style): the tiny CogVideoX with an image-conditioned
transformer.

The image-to-video checkpoint is weights of its own: its transformer takes the noise and the image's VAE
latents side by side (twice the latent channels), and, as CogVideoX-5b-I2V, adds learned positional
embeddings on top of its 3D RoPE. Those embeddings are laid out for the sample size alone, so the
transformer computes only that size (another fails inside its patch embedding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.cogvideox import LATENT_CHANNELS
from tiny_pipelines.cogvideox import RECIPE as COGVIDEOX_RECIPE
from tiny_pipelines.cogvideox import SMALL_CALL as COGVIDEOX_SMALL_CALL
from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_encoder
from tiny_pipelines.tokenizers import t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

# The sample size (64x64, 9 frames -> 3 latent frames of 8x8), the one size the learned embeddings cover.
SMALL_CALL: Mapping[str, Any] = COGVIDEOX_SMALL_CALL

RECIPE: Mapping[str, Mapping[str, Any]] = {
    "transformer": {
        **COGVIDEOX_RECIPE["transformer"],
        "in_channels": 2 * LATENT_CHANNELS,
        "use_learned_positional_embeddings": True,
    },
    "vae": COGVIDEOX_RECIPE["vae"],
    "text_encoder": T5_ENCODER,
    # CogVideoX-5b-I2V's scheduler is the text model's.
    "scheduler": COGVIDEOX_RECIPE["scheduler"],
}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import CogVideoXImageToVideoPipeline

    tokenizer = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: CogVideoXTransformer3DModel(**recipe["transformer"]),
            "vae": lambda: AutoencoderKLCogVideoX(**recipe["vae"]),
            "text_encoder": lambda: t5_encoder(tokenizer, recipe["text_encoder"]),
        },
    )
    modules.update(tokenizer=tokenizer, scheduler=CogVideoXDDIMScheduler(**recipe["scheduler"]))
    return CogVideoXImageToVideoPipeline(**modules)
