"""Tiny AuraFlowPipeline: 2 MMDiT (joint) and 2 single DiT blocks, a UMT5 text encoder.

AuraFlow's transformer adds 8 learned register tokens to the image tokens and a learned position table
(``pos_embed_max_size`` positions, a square grid whose centre the image's patches take), so a request
larger than the table's grid fails. The text encoder is a UMT5 (EleutherAI's pile-t5-xl as released);
its output is zeroed on padding and the transformer sees every one of the ``max_sequence_length`` (256)
tokens. ``guidance_scale`` > 1 (3.5 by default) is true classifier-free guidance, a batched
unconditional pass on the negative prompt (the empty prompt unless one is given).

Unlike most pipelines, ``__call__`` defaults to 1024x1024 rather than to the transformer's sample size,
which it uses only when a call passes ``height=None``/``width=None``.

The prompt moves this tiny model's output only a little (about 1e-4 of the pixel range, where Flux's
tiny model moves by 1e-2): an AuraFlow block feeds its attention output only through the feed-forward, so
the text reaches the image tokens through two modulation gates, each about 0.04 under PyTorch's default
initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.flux import IMAGE_VAE
from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_config
from tiny_pipelines.tokenizers import t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

# The pipeline wants multiples of 8 pixels (4x VAE, 2x2 patches): 32 gives a 4x4 token grid.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32}
_VAE_SCALE = 4
PATCH = 2

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels, 2x2 patches; the caption projection is the transformer's width, as the
    # joint blocks require. The position table is a 64x64 grid of patches, 512x512 pixels through the 4x
    # VAE; the sample size is SMALL_CALL's latent size.
    "transformer": {
        "sample_size": SMALL_CALL["height"] // _VAE_SCALE,
        "patch_size": PATCH,
        "in_channels": IMAGE_VAE["latent_channels"],
        "out_channels": IMAGE_VAE["latent_channels"],
        "num_mmdit_layers": 2,
        "num_single_dit_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_ENCODER["d_model"],
        "caption_projection_dim": 32,
        "pos_embed_max_size": 64 * 64,
    },
    # Flux's tiny VAE; AuraFlow decodes with its scale and no shift.
    "vae": IMAGE_VAE,
    "text_encoder": T5_ENCODER,
    # AuraFlow's schedule: a fixed shift of 1.73.
    "scheduler": {"shift": 1.73},
}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.auraflow_transformer_2d import AuraFlowTransformer2DModel
    from diffusers.pipelines.aura_flow.pipeline_aura_flow import AuraFlowPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: AuraFlowTransformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKL(**recipe["vae"]).eval(),
            "text_encoder": lambda: UMT5EncoderModel(
                UMT5Config(**t5_config(tokenizer, recipe["text_encoder"]))
            ).eval(),
        },
    )
    modules.update(tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]))
    return AuraFlowPipeline(**modules)
