"""Tiny PixArtSigmaPipeline: 4 blocks with cross-attention to a T5 encoder.

By default the pipeline snaps every size to its aspect-ratio table for the transformer's
``sample_size`` (it refuses sizes outside the released 256, 512, 1024 and 2048 tables), generates
there and resizes the image back. The transformer here claims the 256 table, so a square request is
made at 256x256 pixels (a 16x16 token grid through the 8x VAE) whatever its size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_encoder
from tiny_pipelines.tokenizers import t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

LATENT_CHANNELS = 4

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels, 2x2 patches; twice the latent channels out (noise and learned variance).
    "transformer": {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": LATENT_CHANNELS,
        "out_channels": 2 * LATENT_CHANNELS,
        "num_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "cross_attention_dim": 32,
        "caption_channels": T5_ENCODER["d_model"],
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "num_embeds_ada_norm": 1000,
        "attention_bias": True,
        "activation_fn": "gelu-approximate",
    },
    # Four resolutions, so 8x, as released: binned sizes are hundreds of pixels. Four channels at
    # full resolution keep decoding 256x256 cheap; the scale is not the identity so that decoding
    # exercises it.
    "vae": {
        "block_out_channels": (4, 8, 8, 8),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 4,
        "mid_block_add_attention": False,
        "sample_size": 256,
        "scaling_factor": 0.6,
    },
    "text_encoder": T5_ENCODER,
    # PixArt's released scheduler: DPM-Solver++ on a linear beta schedule, predicting the noise.
    "scheduler": {
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
    },
}

# Without the size binning, 64 pixels is a 4x4 token grid; with it (the default), any multiple of 8.
SMALL_CALL: Mapping[str, Any] = {"width": 64, "height": 64}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    tokenizer = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: PixArtTransformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKL(**recipe["vae"]).eval(),
            "text_encoder": lambda: t5_encoder(tokenizer, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=tokenizer, scheduler=DPMSolverMultistepScheduler(**recipe["scheduler"]))
    return PixArtSigmaPipeline(**modules)
