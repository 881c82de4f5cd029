"""Tiny SanaPipeline: 2 linear-attention blocks with cross-attention to a Gemma 2 text encoder, a deep
compression autoencoder (DC-AE, 32x).

By default (``use_resolution_binning=True``) the pipeline snaps every size to its aspect-ratio table
for the transformer's ``sample_size`` (16, 32, 64 or 128 latents: the 512, 1024, 2048 and 4096 pixel
tables), generates there and resizes the image back. The transformer here claims the 512 table, as
Sana's 512 px models do, so a square request is made at 512x512 pixels, a 16x16 token grid through the
32x DC-AE, whatever its size; a 32x VAE keeps that grid small, which is why this one has all six of the
released resolutions.

Every prompt is lower-cased and prefixed with Sana's "complex human instruction" (a default argument of
``__call__``); the text encoder reads instruction and prompt together, padded to the instruction's
length + ``max_sequence_length`` - 2, and the pipeline keeps the first position (<bos>) and the last
``max_sequence_length`` - 1 (299): the prompt and its padding. The tokenizer here has each word of the
instruction as one token, as Gemma's has, so the instruction is about as many tokens long (210) as it is
released. The negative prompt (the empty one by default) is encoded without the instruction and is not
cut. Guidance is classifier-free, on when ``guidance_scale`` > 1 (the default is 4.5).

Gemma's tokenizer and text encoder come from ``lumina2``, which conditions on Gemma 2 too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.llm import template_words
from tiny_pipelines.lumina2 import GEMMA2_TEXT, TEXT_HIDDEN, gemma2_text_encoder, gemma_tokenizer
from tiny_pipelines.seeding import seeded
from tiny_pipelines.tokenizers import WORDS

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import GemmaTokenizer

LATENT_CHANNELS = 8

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels in self-attention (linear) and in cross-attention, 1x1 patches, as released.
    # sample_size 16 picks the 512 pixel aspect-ratio table and sizes the patch embedding, which has no
    # positional embedding (interpolation_scale None), as released.
    "transformer": {
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 16,
        "cross_attention_dim": 32,
        "caption_channels": TEXT_HIDDEN,
        "mlp_ratio": 2.5,
        "sample_size": 16,
        "patch_size": 1,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": None,
    },
    # Six resolutions, so 32x, with the released block kinds (ResBlocks in the three finest, EfficientViT
    # blocks with 5x5 multi-scale attention in the three coarsest) and one block each; 8 channels at full
    # resolution keep decoding 512x512 cheap. The scale is Sana's.
    "vae": {
        "in_channels": 3,
        "latent_channels": LATENT_CHANNELS,
        "attention_head_dim": 8,
        "encoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        "decoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        "encoder_block_out_channels": (8, 8, 16, 16, 32, 32),
        "decoder_block_out_channels": (8, 8, 16, 16, 32, 32),
        "encoder_layers_per_block": (1, 1, 1, 1, 1, 1),
        "decoder_layers_per_block": (1, 1, 1, 1, 1, 1),
        "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
        "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
        "upsample_block_type": "interpolate",
        "downsample_block_type": "Conv",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
        "scaling_factor": 0.41407,
    },
    # Two layers; the pipeline reads the last hidden state (after the final norm).
    "text_encoder": GEMMA2_TEXT,
    # Sana's released scheduler: DPM-Solver++ over flow-matching sigmas, shifted by 3.
    "scheduler": {
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": 3.0,
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
    },
}

# The pipeline demands multiples of 32 pixels. Without the size binning, 128 pixels is a 4x4 token grid;
# with it (the default), any multiple of 32 is generated at 512x512 and resized.
SMALL_CALL: Mapping[str, Any] = {"width": 128, "height": 128}


def tokenizer() -> GemmaTokenizer:
    import inspect

    from diffusers.pipelines.sana.pipeline_sana import SanaPipeline

    # The instruction is the default of __call__'s complex_human_instruction, a list of lines.
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    return gemma_tokenizer((*WORDS, *template_words(*instruction)))


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_dc import AutoencoderDC
    from diffusers.models.transformers.sana_transformer import SanaTransformer2DModel
    from diffusers.pipelines.sana.pipeline_sana import SanaPipeline
    from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

    gemma = tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: SanaTransformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderDC(**recipe["vae"]).eval(),
            "text_encoder": lambda: gemma2_text_encoder(gemma, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=gemma, scheduler=DPMSolverMultistepScheduler(**recipe["scheduler"]))
    return SanaPipeline(**modules)
