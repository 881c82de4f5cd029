"""Tiny HiDreamImagePipeline: 2 dual-stream and 2 single-stream mixture-of-experts blocks, four text encoders.

HiDream-I1 conditions on two CLIPs with projection (their pooled outputs, concatenated, are the pooled
embedding), a T5 and a Llama 3.1 (every layer's hidden state: each block reads the one ``llama_layers``
names, and the last named one also joins T5's in the initial text tokens). Llama's tokenizer is a
byte-level BPE starting each text with ``<|begin_of_text|>``, saved as a plain ``PreTrainedTokenizerFast``.
Each block's feed-forward is a mixture of experts: a shared expert plus 2 of 4 routed ones.

The pipeline ignores the requested size but for its aspect ratio: it rescales every request to the area
of a 128x128 latent (``default_sample_size``, fixed in the pipeline), so the image is always about
(128 x the VAE's scale factor)² pixels: 1024x1024 for the released 8x VAE. The VAE here keeps full
resolution (one level, no downsampling), so a square request gives 128x128 pixels, the smallest image the
pipeline can make, and 2x2 patches make it 64x64 = 4096 image tokens whatever the VAE (a 128x64 request
gives 180x90 pixels).

``guidance_scale`` (default 5) is true classifier-free guidance: above 1 the pipeline encodes
``negative_prompt`` (default the empty prompt; ``negative_prompt_2`` to ``_4`` per text encoder) and runs
the transformer on a batch of 2 (the docstring's "embedded guidance" is not what the code does). In
training mode the transformer takes another path (MoE routing with an auxiliary loss, another output
layout), so build leaves it in eval mode. The pipeline asks Llama for its attentions, which its SDPA
attention does not return: transformers warns once, and the hidden states are unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.llm import fast_tokenizer
from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import CLIP_TEXT, T5_ENCODER, clip_text_model_with_projection, t5_encoder
from tiny_pipelines.tokenizers import clip_tokenizer, t5_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import CLIPTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

LATENT_CHANNELS = 4
# Long-CLIP's context: the pipeline pads CLIP prompts to min(max_sequence_length, 218) tokens, past
# CLIP's 77, so the released CLIPs have 248 positions.
LONG_CLIP_POSITIONS = 248
LONG_CLIP: Mapping[str, Any] = {**CLIP_TEXT, "max_position_embeddings": LONG_CLIP_POSITIONS}

# Llama 3.1 Instruct's control tokens: <|begin_of_text|> opens every text, <|eot_id|> ends it (and pads:
# the pipeline sets pad = eos).
LLAMA_BOS = "<|begin_of_text|>"
LLAMA_EOS = "<|eot_id|>"
LLAMA_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    LLAMA_EOS,
)

LLAMA: Mapping[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 1024,
}

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 1 head of 16 channels: attention over 4096 image tokens is most of the time, and CPU attention is
    # slower on narrower heads. The RoPE axes (unused, row, column) sum to the head dim. One Llama layer
    # per block, as ``llama_layers`` lists them; caption_channels is (T5's width, Llama's width).
    # max_resolution is the released one: the largest latent, whose token count sets the schedule's
    # shift and the length non-square latents are padded to.
    "transformer": {
        "patch_size": 2,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 1,
        "caption_channels": (T5_ENCODER["d_model"], LLAMA["hidden_size"]),
        "text_emb_dim": 2 * LONG_CLIP["projection_dim"],
        "num_routed_experts": 4,
        "num_activated_experts": 2,
        "axes_dims_rope": (8, 4, 4),
        "max_resolution": (128, 128),
        "llama_layers": (0, 1, 2, 3),
    },
    # One level: no downsampling (see the module docstring). shift and scale are not the identity so
    # that decoding exercises them.
    "vae": {
        "block_out_channels": (8,),
        "down_block_types": ("DownEncoderBlock2D",),
        "up_block_types": ("UpDecoderBlock2D",),
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 4,
        "mid_block_add_attention": False,
        "sample_size": 128,
        "scaling_factor": 0.6,
        "shift_factor": 0.05,
    },
    "text_encoder": LONG_CLIP,
    "text_encoder_2": LONG_CLIP,
    "text_encoder_3": T5_ENCODER,
    "text_encoder_4": LLAMA,
    # HiDream-I1-Full's scheduler: UniPC over flow sigmas shifted by 3 (the pipeline steps it on its own
    # path, with no dynamic shift).
    "scheduler": {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
}

# Any size comes out as a 128x128 latent's area (see the module docstring): with this VAE, 128x128
# pixels for a square request. Sizes are rounded down to multiples of 2 x the VAE's scale factor.
SMALL_CALL: Mapping[str, Any] = {"width": 128, "height": 128}


def long_clip_tokenizer() -> CLIPTokenizer:
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = LONG_CLIP_POSITIONS
    return tokenizer


def llama_tokenizer() -> PreTrainedTokenizerFast:
    return fast_tokenizer(
        LLAMA_SPECIAL_TOKENS,
        prefix=(LLAMA_BOS,),
        bos_token=LLAMA_BOS,
        eos_token=LLAMA_EOS,
        pad_token=LLAMA_EOS,
    )


def llama(tokenizer: PreTrainedTokenizerFast, recipe: Mapping[str, Any]) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **recipe,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_hidream_image import HiDreamImageTransformer2DModel
    from diffusers.pipelines.hidream_image.pipeline_hidream_image import HiDreamImagePipeline
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

    tokenizer = long_clip_tokenizer()
    tokenizer_2 = long_clip_tokenizer()
    tokenizer_3 = t5_tokenizer()
    tokenizer_4 = llama_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: HiDreamImageTransformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKL(**recipe["vae"]).eval(),
            "text_encoder": lambda: clip_text_model_with_projection(tokenizer, recipe["text_encoder"]).eval(),
            "text_encoder_2": lambda: clip_text_model_with_projection(
                tokenizer_2, recipe["text_encoder_2"]
            ).eval(),
            "text_encoder_3": lambda: t5_encoder(tokenizer_3, recipe["text_encoder_3"]).eval(),
            "text_encoder_4": lambda: llama(tokenizer_4, recipe["text_encoder_4"]).eval(),
        },
    )
    modules.update(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
        tokenizer_4=tokenizer_4,
        scheduler=UniPCMultistepScheduler(**recipe["scheduler"]),
    )
    return HiDreamImagePipeline(**modules)
