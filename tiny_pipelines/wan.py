"""Tiny WanPipeline: Wan 2.1 (4 blocks, a UMT5 text encoder, a causal 3D VAE), Wan 2.2 A14B (two such
experts) and Wan 2.2 TI2V 5B (one transformer on a 48-channel VAE, a timestep per token), below."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_config
from tiny_pipelines.tokenizers import t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

LATENT_CHANNELS = 8

TRANSFORMER: Mapping[str, Any] = {
    # 4 blocks, 2 heads of 16 channels, 2x2 spatial patches.
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "text_dim": 64,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 32,
}

RECIPE: Mapping[str, Mapping[str, Any]] = {
    "transformer": TRANSFORMER,
    # 8x spatial and 4x temporal compression, as in Wan 2.1: 5 frames of 32x32 -> 2 latent frames of
    # 4x4. The latent statistics are not the identity so that decoding exercises them.
    "vae": {
        "base_dim": 8,
        "z_dim": LATENT_CHANNELS,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "latents_mean": [round(0.1 * i - 0.35, 2) for i in range(LATENT_CHANNELS)],
        "latents_std": [round(0.8 + 0.05 * i, 2) for i in range(LATENT_CHANNELS)],
    },
    "text_encoder": T5_ENCODER,
    # Wan 2.1's text-to-video scheduler.
    "scheduler": {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
}

SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32, "num_frames": 5}


def components(
    recipe: Mapping[str, Mapping[str, Any]], seed: int, **more: Callable[[], Any]
) -> dict[str, Any]:
    """A Wan pipeline's components from ``recipe``, each seeded by its name: every transformer it names
    (``transformer``, and Wan 2.2's second expert ``transformer_2``), the VAE, the UMT5 text encoder and
    ``more``; with the tokenizer and the UniPC scheduler."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    makers: dict[str, Callable[[], Any]] = {
        name: functools.partial(WanTransformer3DModel, **recipe[name])
        for name in ("transformer", "transformer_2")
        if name in recipe
    }
    makers["vae"] = functools.partial(AutoencoderKLWan, **recipe["vae"])
    makers["text_encoder"] = lambda: UMT5EncoderModel(
        UMT5Config(**t5_config(tokenizer, recipe["text_encoder"]))
    )
    modules = seeded(seed, {**makers, **more})
    modules.update(tokenizer=tokenizer, scheduler=UniPCMultistepScheduler(**recipe["scheduler"]))
    return modules


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    return WanPipeline(**components(recipe, seed))


# Wan 2.2 A14B: the same transformer twice, a high-noise expert (``transformer``) for timesteps at or above
# boundary_ratio x 1000 and a low-noise expert (``transformer_2``) below, with Wan 2.1's VAE and text encoder.
WAN22_RECIPE: Mapping[str, Mapping[str, Any]] = {
    "transformer": TRANSFORMER,
    "transformer_2": TRANSFORMER,
    "vae": RECIPE["vae"],
    "text_encoder": T5_ENCODER,
    # The text-to-video A14B's shift: with 4 steps the timesteps are about 1000, 973, 923 and 800, so three
    # steps go to the high-noise expert and the last to the low-noise one.
    "scheduler": {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 12.0},
    "pipeline": {"boundary_ratio": 0.875},
}

# 64x64 pixels -> 8x8 latents -> a 4x4 token grid (Wan 2.1's SMALL_CALL stops at 2x2); 5 frames -> 2 latent
# frames.
WAN22_SMALL_CALL: Mapping[str, Any] = {"width": 64, "height": 64, "num_frames": 5}


def wan22_build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    # One seed stream per component name, so the two experts start from different weights.
    return WanPipeline(**components(recipe, seed), **recipe["pipeline"])


# Wan 2.2 TI2V 5B: one transformer on the 48-channel VAE (16x spatial: 2x2 pixel patches, then 8x, with
# residual down- and upsampling), no image encoder, and expand_timesteps: the transformer gets one timestep
# per token. The published checkpoint is this WanPipeline, whose tokens all denoise at the step's timestep;
# its image-to-video pipeline (tiny_pipelines.wan_i2v) is built from the same recipe, the same components,
# and holds the image's first latent frame at 0.
TI2V_LATENT_CHANNELS = 48
TI2V_RECIPE: Mapping[str, Mapping[str, Any]] = {
    "transformer": {**TRANSFORMER, "in_channels": TI2V_LATENT_CHANNELS, "out_channels": TI2V_LATENT_CHANNELS},
    "vae": {
        "base_dim": 8,
        "z_dim": TI2V_LATENT_CHANNELS,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "is_residual": True,
        # 2x2 pixel patches as 4 x 3 channels in and out.
        "in_channels": 12,
        "out_channels": 12,
        "patch_size": 2,
        "scale_factor_spatial": 16,
        "scale_factor_temporal": 4,
        "latents_mean": [round(0.02 * i - 0.45, 2) for i in range(TI2V_LATENT_CHANNELS)],
        "latents_std": [round(0.8 + 0.01 * i, 2) for i in range(TI2V_LATENT_CHANNELS)],
    },
    "text_encoder": T5_ENCODER,
    # The TI2V 5B's shift.
    "scheduler": {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 5.0},
    "pipeline": {"expand_timesteps": True},
}

# Multiples of 32 pixels (16x VAE, 2x2 patches): 5 frames of 64x64 -> 2 latent frames of 4x4, a 2x2 token grid.
TI2V_SMALL_CALL: Mapping[str, Any] = {"width": 64, "height": 64, "num_frames": 5}


def ti2v_build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    return WanPipeline(**components(recipe, seed), **recipe["pipeline"])
