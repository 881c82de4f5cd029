"""Tiny QwenImagePipeline: 4 blocks, a Qwen2.5-VL text encoder, Qwen-Image's causal 3D VAE.

The pipeline wraps every prompt in a fixed chat template and drops the template's first 34 tokens
(what Qwen's tokenizer makes of the system turn and the user turn's opening) from the text encoder's
output. The tokenizer here has each word of that template as one token, so the same 34 tokens are
dropped and the prompt's own tokens are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.llm import QWEN_CONTROL_TOKENS, qwen2_tokenizer, template_words
from tiny_pipelines.seeding import seeded
from tiny_pipelines.tokenizers import WORDS

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

# QwenImagePipeline.prompt_template_encode, copied: its words join the vocabulary.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

# Qwen2.5-VL's vision markers; the text encoder's config names their ids, as the released one does.
VISION_TOKENS: Mapping[str, str] = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}

TEXT_HIDDEN = 32
LATENT_CHANNELS = 8

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels; the RoPE axes (frame, height, width) sum to the head dim. in_channels is
    # 4x the VAE's latent channels: Qwen-Image packs 2x2 latent patches into one token.
    "transformer": {
        "patch_size": 2,
        "in_channels": 4 * LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "num_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": TEXT_HIDDEN,
        "axes_dims_rope": (4, 6, 6),
    },
    # Two downsamplings, so 4x: 32x32 pixels -> 8x8 latent -> 4x4 tokens. The latent statistics are
    # not the identity so that decoding exercises them.
    "vae": {
        "base_dim": 8,
        "z_dim": LATENT_CHANNELS,
        "dim_mult": [1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True],
        "latents_mean": [round(0.1 * i - 0.35, 2) for i in range(LATENT_CHANNELS)],
        "latents_std": [round(0.8 + 0.05 * i, 2) for i in range(LATENT_CHANNELS)],
    },
    # Two layers; the multimodal RoPE sections (time, height, width) sum to half the head dim. The
    # vision tower is never run on text, but it is part of the class and of the saved model.
    "text_encoder": {
        "text_config": {
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "fullatt_block_indexes": [0],
        },
    },
    # Qwen-Image's schedule: the shift follows the image's token count, exponentially.
    "scheduler": {
        "shift": 1.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 0.9,
        "base_image_seq_len": 256,
        "max_image_seq_len": 8192,
        "shift_terminal": 0.02,
        "time_shift_type": "exponential",
    },
}

# The pipeline wants multiples of 8 pixels (4x VAE, 2x2 packing); 32 gives a 4x4 token grid.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32}


def tokenizer() -> Qwen2Tokenizer:
    return qwen2_tokenizer(
        control_tokens=(*QWEN_CONTROL_TOKENS, *VISION_TOKENS.values()),
        words=(*WORDS, *template_words(PROMPT_TEMPLATE)),
        eos_token="<|im_end|>",
    )


def text_encoder(tokenizer: Qwen2Tokenizer, recipe: Mapping[str, Any]) -> Qwen2_5_VLForConditionalGeneration:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {
        "vocab_size": len(tokenizer),
        # As released: Qwen has no BOS token in its texts, but names <|endoftext|>.
        "bos_token_id": tokenizer.pad_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision_ids: dict[str, Any] = {
        name: tokenizer.convert_tokens_to_ids(token) for name, token in VISION_TOKENS.items()
    }
    config = Qwen2_5_VLConfig(
        text_config={**recipe["text_config"], **ids},
        vision_config=dict(recipe["vision_config"]),
        **vision_ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformer2DModel
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    qwen_tokenizer = tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: QwenImageTransformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKLQwenImage(**recipe["vae"]).eval(),
            "text_encoder": lambda: text_encoder(qwen_tokenizer, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=qwen_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]))
    return QwenImagePipeline(**modules)
