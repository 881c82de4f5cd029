"""Tiny FluxPipeline: 2 double-stream and 4 single-stream blocks, CLIP and T5 text encoders."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import CLIP_TEXT, T5_ENCODER, clip_text_model, t5_encoder
from tiny_pipelines.tokenizers import clip_tokenizer, t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

# Three VAE resolutions, so 4x downsampling, and Flux packs 2x2 latent patches into one token:
# 64x64 pixels -> 16x16x8 latent -> 8x8 = 64 tokens. shift and scale are not the identity so that
# decoding exercises them.
IMAGE_VAE: Mapping[str, Any] = {
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "latent_channels": 8,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "sample_size": 64,
    "scaling_factor": 0.6,
    "shift_factor": 0.05,
}

# FLUX.1-dev's schedule: the shift follows the image's token count.
FLOW_MATCH_SCHEDULER: Mapping[str, Any] = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 32 channels; RoPE axes sum to the head dim. in_channels is 4x the VAE's latent
    # channels: Flux packs 2x2 latent patches into one token.
    "transformer": {
        "patch_size": 1,
        "in_channels": 32,
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "guidance_embeds": False,
        "axes_dims_rope": (8, 12, 12),
    },
    "vae": IMAGE_VAE,
    "text_encoder": CLIP_TEXT,
    "text_encoder_2": T5_ENCODER,
    "scheduler": FLOW_MATCH_SCHEDULER,
}

# The smallest request worth making: one 8x8 token grid.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: FluxTransformer2DModel(**recipe["transformer"]),
            "vae": lambda: AutoencoderKL(**recipe["vae"]),
            "text_encoder": lambda: clip_text_model(tokenizer, recipe["text_encoder"]),
            "text_encoder_2": lambda: t5_encoder(tokenizer_2, recipe["text_encoder_2"]),
        },
    )
    modules.update(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]),
    )
    return FluxPipeline(**modules)
