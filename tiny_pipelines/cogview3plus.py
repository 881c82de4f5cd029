"""Tiny CogView3PlusPipeline: 2 blocks, a T5 text encoder, CogVideoX's DDIM scheduler.

CogView3-Plus is a single-stream DiT: text and image tokens are concatenated and share every block,
modulated by the timestep and SDXL-like size conditions (``original_size``, ``target_size``,
``crops_coords_top_left``, call arguments with defaults taken from the request). Positions are a fixed
2D sin-cos table of ``pos_embed_max_size`` x ``pos_embed_max_size`` patches, so a request larger than
the table fails. ``guidance_scale`` > 1 (5.0 by default) is true classifier-free guidance, a batched
unconditional pass; without a ``negative_prompt`` the unconditional text embedding is all zeros (not the
empty prompt's encoding). Prompts are padded to ``max_sequence_length`` (224) tokens.

The scheduler is ``CogVideoXDDIMScheduler``: v-prediction on a zero-terminal-SNR schedule, trailing
timesteps, an SNR shift of 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.flux import IMAGE_VAE
from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_encoder
from tiny_pipelines.tokenizers import t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

# The pipeline demands multiples of 8 pixels, which with the 4x VAE and 2x2 patches is exactly what the
# transformer needs; 32 gives a 4x4 token grid.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32}
_VAE_SCALE = 4

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels, 2x2 patches. The position table covers 64x64 patches, 512x512 pixels
    # through the 4x VAE; the sample size is SMALL_CALL's latent size, so a call without sizes asks for
    # SMALL_CALL. Each size condition is 2 numbers, each embedded in condition_dim channels.
    "transformer": {
        "patch_size": 2,
        "in_channels": IMAGE_VAE["latent_channels"],
        "out_channels": IMAGE_VAE["latent_channels"],
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "text_embed_dim": T5_ENCODER["d_model"],
        "time_embed_dim": 32,
        "condition_dim": 8,
        "pos_embed_max_size": 64,
        "sample_size": SMALL_CALL["height"] // _VAE_SCALE,
    },
    # Flux's tiny VAE; CogView3-Plus decodes with its scale and no shift.
    "vae": IMAGE_VAE,
    "text_encoder": T5_ENCODER,
    # CogView3-Plus-3B's scheduler.
    "scheduler": {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "set_alpha_to_one": True,
        "snr_shift_scale": 4.0,
        "timestep_spacing": "trailing",
    },
}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_cogview3plus import CogView3PlusTransformer2DModel
    from diffusers.pipelines.cogview3.pipeline_cogview3plus import CogView3PlusPipeline
    from diffusers.schedulers.scheduling_ddim_cogvideox import CogVideoXDDIMScheduler

    tokenizer = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: CogView3PlusTransformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKL(**recipe["vae"]).eval(),
            "text_encoder": lambda: t5_encoder(tokenizer, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=tokenizer, scheduler=CogVideoXDDIMScheduler(**recipe["scheduler"]))
    return CogView3PlusPipeline(**modules)
