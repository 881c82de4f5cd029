"""Tiny StableDiffusion3Pipeline: 4 joint blocks, two CLIP encoders with projection and a T5."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.flux import FLOW_MATCH_SCHEDULER, IMAGE_VAE
from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import CLIP_TEXT, T5_ENCODER, clip_text_model_with_projection, t5_encoder
from tiny_pipelines.tokenizers import clip_tokenizer, t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

# SD3 concatenates the two CLIPs' hidden states along channels and zero-pads them to T5's width (a
# wider concatenation would be cropped), and concatenates their projections into the pooled
# embedding. So each CLIP is half T5's width.
_CLIP_WIDTH = T5_ENCODER["d_model"] // 2
SD3_CLIP_TEXT: Mapping[str, Any] = {
    **CLIP_TEXT,
    "hidden_size": _CLIP_WIDTH,
    "intermediate_size": 2 * _CLIP_WIDTH,
    "projection_dim": _CLIP_WIDTH,
    "num_attention_heads": 2,
}

# Flux's tiny VAE with SD3's own latent width: SD3's inpainting pipeline takes a transformer of 16
# input channels (or 33, for a dedicated inpainting one) and blends its latents with the image's.
# SD3 decodes with the same shift and scale.
SD3_VAE: Mapping[str, Any] = {**IMAGE_VAE, "latent_channels": 16}

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels, 2x2 patches; the last block only updates the image stream. The
    # position table covers 64x64 patches, 512x512 pixels through the 4x VAE.
    "transformer": {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": SD3_VAE["latent_channels"],
        "out_channels": SD3_VAE["latent_channels"],
        "num_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_ENCODER["d_model"],
        "caption_projection_dim": 32,
        "pooled_projection_dim": 2 * _CLIP_WIDTH,
        "pos_embed_max_size": 64,
    },
    "vae": SD3_VAE,
    "text_encoder": SD3_CLIP_TEXT,
    "text_encoder_2": SD3_CLIP_TEXT,
    "text_encoder_3": T5_ENCODER,
    # SD3's schedule is a fixed shift of 3; the dynamic one is for higher resolutions.
    "scheduler": {"shift": FLOW_MATCH_SCHEDULER["shift"]},
}

# The pipeline wants multiples of 8 pixels (4x VAE, 2x2 patches); 32 gives a 4x4 token grid.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer()
    tokenizer_3 = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: SD3Transformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKL(**recipe["vae"]).eval(),
            "text_encoder": lambda: clip_text_model_with_projection(tokenizer, recipe["text_encoder"]).eval(),
            "text_encoder_2": lambda: clip_text_model_with_projection(
                tokenizer_2, recipe["text_encoder_2"]
            ).eval(),
            "text_encoder_3": lambda: t5_encoder(tokenizer_3, recipe["text_encoder_3"]).eval(),
        },
    )
    modules.update(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]),
    )
    return StableDiffusion3Pipeline(**modules)
