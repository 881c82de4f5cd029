"""Tiny MochiPipeline (Mochi 1 preview): 2 asymmetric dual-stream blocks, a T5 text encoder, Mochi's VAE.

Mochi's transformer is an asymmetric MMDiT: the text stream (``pooled_projection_dim`` wide) is narrower
than the visual one, the last block updates only the visual stream, and the conditioning is the timestep
plus an attention-pooled caption. Its RoPE frequencies are learned (``pos_frequencies``) and start at zero
when the model is constructed, which would make the tiny transformer blind to positions; here they are
drawn from the transformer's own seeded stream instead, as a trained model's are not zero.

The pipeline hard-codes Mochi's VAE factors (8x spatial, 6x temporal, 2x2 patches) and its 12 latent
channels, so the tiny ``AutoencoderKLMochi`` keeps its four levels and expansions and only narrows them
(32 channels, the least its 32-group norms take). ``num_frames`` is 6k + 1 (others are rounded down to
that and decode to it); width and height are multiples of 16, though the pipeline checks only for 8 (24
fails in the transformer). The scheduler runs Mochi's linear-quadratic sigmas inverted
(``invert_sigmas``), and that schedule needs at least 2 steps (1 divides by zero).
``guidance_scale`` > 1 (4.5 by default) is true classifier-free guidance, a batched unconditional pass
on the negative prompt (the empty prompt unless one is given). Prompts are padded to
``max_sequence_length`` (256) tokens and the transformer masks the padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_encoder
from tiny_pipelines.tokenizers import t5_tokenizer

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_mochi import MochiTransformer3DModel
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

# The pipeline's fixed factors, so multiples of 16 pixels: 32x32 pixels -> 4x4 latents -> a 2x2 grid of
# 2x2 patches; 7 frames -> 2 latent frames.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32, "num_frames": 7}

# The spread of the learned RoPE frequencies (radians per position unit; the spatial positions span about
# +-96 units whatever the size, the temporal ones count latent frames).
POS_FREQUENCY_STD = 0.1

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels; the text stream is half the visual width, as in Mochi (1536 against 3072).
    "transformer": {
        "patch_size": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "pooled_projection_dim": 16,
        "in_channels": 12,
        "qk_norm": "rms_norm",
        "text_embed_dim": T5_ENCODER["d_model"],
        "time_embed_dim": 32,
        "activation_fn": "swiglu",
        "max_sequence_length": 256,
    },
    # Mochi's levels and expansions (the latent statistics are the class defaults, Mochi's own), one
    # layer per block; the encoder is built but a text-to-video call never runs it.
    "vae": {
        "latent_channels": 12,
        "encoder_block_out_channels": (32, 32, 32, 32),
        "decoder_block_out_channels": (32, 32, 32, 32),
        "layers_per_block": (1, 1, 1, 1, 1),
        "temporal_expansions": (1, 2, 3),
        "spatial_expansions": (2, 2, 2),
    },
    "text_encoder": T5_ENCODER,
    # Mochi's scheduler: the pipeline passes its own sigmas, which this one inverts.
    "scheduler": {"invert_sigmas": True},
}


def transformer(recipe: Mapping[str, Any]) -> MochiTransformer3DModel:
    import torch
    from diffusers.models.transformers.transformer_mochi import MochiTransformer3DModel

    model = MochiTransformer3DModel(**recipe)
    with torch.no_grad():
        model.pos_frequencies.normal_(std=POS_FREQUENCY_STD)
    return model


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl_mochi import AutoencoderKLMochi
    from diffusers.pipelines.mochi.pipeline_mochi import MochiPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    tokenizer = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: transformer(recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKLMochi(**recipe["vae"]).eval(),
            "text_encoder": lambda: t5_encoder(tokenizer, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]))
    return MochiPipeline(**modules)
