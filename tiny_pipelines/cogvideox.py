"""Tiny CogVideoXPipeline (CogVideoX-5b style): 4 blocks with 3D RoPE, a T5 text encoder, a causal 3D VAE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_encoder
from tiny_pipelines.tokenizers import t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

LATENT_CHANNELS = 8
# 8x spatial (four VAE levels) and 4x temporal compression, as in CogVideoX.
VAE_SPATIAL = 8
VAE_TEMPORAL = 4
PATCH = 2

# The VAE's temporal upsampling keeps a lone first frame only when the latent frame count is odd, so only
# an odd count decodes back to the 1 + 4k frames asked for (5 frames -> 2 latent frames -> 8 frames out):
# 9 frames -> 3 latent frames. 64x64 pixels -> 8x8 latents -> a 4x4 grid of 2x2 patches.
SMALL_CALL: Mapping[str, Any] = {"width": 64, "height": 64, "num_frames": 9}

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels. 3D RoPE (the 5b variant) splits the head dim 4 + 6 + 6 over (t, h, w).
    # The sample size is SMALL_CALL's latent size, so a call without sizes asks for SMALL_CALL.
    "transformer": {
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "time_embed_dim": 32,
        "text_embed_dim": T5_ENCODER["d_model"],
        "num_layers": 4,
        "sample_width": SMALL_CALL["width"] // VAE_SPATIAL,
        "sample_height": SMALL_CALL["height"] // VAE_SPATIAL,
        "sample_frames": SMALL_CALL["num_frames"],
        "patch_size": PATCH,
        "temporal_compression_ratio": VAE_TEMPORAL,
        "use_rotary_positional_embeddings": True,
    },
    "vae": {
        "block_out_channels": (8, 8, 8, 8),
        "latent_channels": LATENT_CHANNELS,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "temporal_compression_ratio": VAE_TEMPORAL,
        "sample_height": SMALL_CALL["height"],
        "sample_width": SMALL_CALL["width"],
        "scaling_factor": 0.7,
    },
    "text_encoder": T5_ENCODER,
    # CogVideoX-5b's scheduler: v-prediction on a zero-terminal-SNR schedule, trailing timesteps.
    "scheduler": {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "set_alpha_to_one": True,
        "snr_shift_scale": 1.0,
        "timestep_spacing": "trailing",
    },
}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

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
    return CogVideoXPipeline(**modules)
