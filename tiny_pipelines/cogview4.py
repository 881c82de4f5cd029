"""Tiny CogView4Pipeline: 4 blocks, a GLM text encoder and GLM's tokenizer.

GLM-4's tokenizer is a byte-level BPE whose post-processor starts every text with ``[gMASK]<sop>``,
saved as a plain ``PreTrainedTokenizerFast``; the pipeline left-pads its output to a multiple of 16
tokens and reads the text encoder's second-to-last hidden state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.flux import IMAGE_VAE
from tiny_pipelines.llm import fast_tokenizer
from tiny_pipelines.seeding import seeded

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import GlmModel, PreTrainedTokenizerFast

TEXT_HIDDEN = 32
# GLM-4's control tokens: <|endoftext|> ends and pads, [gMASK]<sop> opens every text.
GLM_PREFIX: tuple[str, ...] = ("[gMASK]", "<sop>")

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels, 2x2 patches; the RoPE tables cover 64x64 patches, 512x512 pixels
    # through the 4x VAE.
    "transformer": {
        "patch_size": 2,
        "in_channels": IMAGE_VAE["latent_channels"],
        "out_channels": IMAGE_VAE["latent_channels"],
        "num_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "text_embed_dim": TEXT_HIDDEN,
        "time_embed_dim": 32,
        "condition_dim": 8,
        "pos_embed_max_size": 64,
        "sample_size": 16,
        "rope_axes_dim": (64, 64),
    },
    # Flux's tiny VAE; CogView4 decodes with its scale and no shift.
    "vae": IMAGE_VAE,
    # Two layers: the pipeline reads the first one's output. GLM rotates half of each head.
    "text_encoder": {
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,
    },
    # CogView4's schedule: the pipeline computes the shift from the token count, applied linearly.
    "scheduler": {
        "shift": 1.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.25,
        "max_shift": 0.75,
        "base_image_seq_len": 256,
        "time_shift_type": "linear",
    },
}

# The pipeline demands multiples of 16 pixels; 32 gives a 4x4 token grid (4x VAE, 2x2 patches).
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32}


def tokenizer() -> PreTrainedTokenizerFast:
    return fast_tokenizer(
        ("<|endoftext|>",),
        prefix=GLM_PREFIX,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )


def text_encoder(tokenizer: PreTrainedTokenizerFast, recipe: Mapping[str, Any]) -> GlmModel:
    from transformers import GlmConfig, GlmModel

    config = GlmConfig(
        **recipe,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GlmModel(config)


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_cogview4 import CogView4Transformer2DModel
    from diffusers.pipelines.cogview4.pipeline_cogview4 import CogView4Pipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    glm_tokenizer = tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: CogView4Transformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKL(**recipe["vae"]).eval(),
            "text_encoder": lambda: text_encoder(glm_tokenizer, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=glm_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]))
    return CogView4Pipeline(**modules)
