"""Tiny LTXPipeline (LTX-Video 0.9 style): 4 blocks, a T5 text encoder, a 32x spatial and 8x temporal VAE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_encoder
from tiny_pipelines.tokenizers import t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

LATENT_CHANNELS = 8
INNER_DIM = 2 * 16

# LTX's compression: 4x4 pixel patches, then three levels that halve height, width and time together:
# 32x spatial, 8x temporal. The transformer takes 1x1x1 patches, so 128x128 pixels -> a 4x4 token grid and
# 1 + 8k frames -> k + 1 latent frames.
SMALL_CALL: Mapping[str, Any] = {"width": 128, "height": 128, "num_frames": 9}

# The statistics are buffers, not constructor arguments; build sets them. They are not the identity so that
# decoding exercises them.
_VAE_STATISTICS = ("latents_mean", "latents_std")

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels; cross-attention runs at the inner width, the caption projection takes T5's.
    "transformer": {
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "patch_size": 1,
        "patch_size_t": 1,
        "num_attention_heads": 2,
        "attention_head_dim": INNER_DIM // 2,
        "cross_attention_dim": INNER_DIM,
        "num_layers": 4,
        "caption_channels": T5_ENCODER["d_model"],
    },
    "vae": {
        "latent_channels": LATENT_CHANNELS,
        "block_out_channels": (8, 8, 8, 8),
        "decoder_block_out_channels": (8, 8, 8, 8),
        "layers_per_block": (1, 1, 1, 1, 1),
        "decoder_layers_per_block": (1, 1, 1, 1, 1),
        "spatio_temporal_scaling": (True, True, True, False),
        "decoder_spatio_temporal_scaling": (True, True, True, False),
        "patch_size": 4,
        "patch_size_t": 1,
        "latents_mean": [round(0.1 * i - 0.35, 2) for i in range(LATENT_CHANNELS)],
        "latents_std": [round(0.8 + 0.05 * i, 2) for i in range(LATENT_CHANNELS)],
    },
    "text_encoder": T5_ENCODER,
    # LTX-Video's schedule: the shift follows the video's token count, and sigmas end at 0.1.
    "scheduler": {
        "use_dynamic_shifting": True,
        "base_shift": 0.95,
        "max_shift": 2.05,
        "base_image_seq_len": 1024,
        "max_image_seq_len": 4096,
        "shift_terminal": 0.1,
    },
}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    import torch
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline

    def vae() -> AutoencoderKLLTXVideo:
        config = {key: value for key, value in recipe["vae"].items() if key not in _VAE_STATISTICS}
        model = AutoencoderKLLTXVideo(**config)
        for name in _VAE_STATISTICS:
            getattr(model, name).copy_(torch.tensor(recipe["vae"][name]))
        return model

    tokenizer = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: LTXVideoTransformer3DModel(**recipe["transformer"]),
            "vae": vae,
            "text_encoder": lambda: t5_encoder(tokenizer, recipe["text_encoder"]),
        },
    )
    modules.update(tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]))
    return LTXPipeline(**modules)
