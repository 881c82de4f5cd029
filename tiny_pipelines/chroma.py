"""Tiny ChromaPipeline: 2 double-stream and 2 single-stream blocks, a T5 text encoder.

Chroma is FLUX.1 [schnell] pruned: one T5 (no CLIP), and the per-block modulation that Flux computes from
the timestep, guidance and pooled CLIP embedding in every block comes instead from one small MLP, the
"distilled guidance layer" (``approximator_*``), run once per step over a table of modulation indices.
Its guidance input is always zero: ``guidance_scale`` > 1 is true classifier-free guidance, a second
transformer pass on the negative prompt (the empty prompt unless one is given), and it is on by default
(5.0).

The pipeline keeps the text encoder's attention mask and, in the transformer, masks every padding token
but the first; prompts are padded to ``max_sequence_length`` (512, at most 512). ``image_encoder`` and
``feature_extractor`` (a CLIP vision model for IP-Adapters) are optional and left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.flux import FLOW_MATCH_SCHEDULER, IMAGE_VAE
from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_encoder
from tiny_pipelines.tokenizers import t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels; RoPE axes sum to the head dim. in_channels is 4x the VAE's latent channels:
    # Chroma packs 2x2 latent patches into one token. The approximator's input is a quarter timestep, a
    # quarter (zero) guidance and a half modulation-index embedding, approximator_num_channels in all.
    "transformer": {
        "patch_size": 1,
        "in_channels": 4 * IMAGE_VAE["latent_channels"],
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_ENCODER["d_model"],
        "axes_dims_rope": (4, 6, 6),
        "approximator_num_channels": 16,
        "approximator_hidden_dim": 32,
        "approximator_layers": 2,
    },
    # Flux's tiny VAE: Chroma decodes with the same shift and scale.
    "vae": IMAGE_VAE,
    "text_encoder": T5_ENCODER,
    # FLUX.1's schedule: the pipeline computes the shift from the token count.
    "scheduler": FLOW_MATCH_SCHEDULER,
}

# The pipeline wants multiples of 8 pixels (4x VAE, 2x2 packing; it warns and rounds down otherwise);
# 32 gives a 4x4 token grid.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_chroma import ChromaTransformer2DModel
    from diffusers.pipelines.chroma.pipeline_chroma import ChromaPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    tokenizer = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: ChromaTransformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKL(**recipe["vae"]).eval(),
            "text_encoder": lambda: t5_encoder(tokenizer, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]))
    return ChromaPipeline(**modules)
