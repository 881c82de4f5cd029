"""Tiny HunyuanVideo15Pipeline (HunyuanVideo 1.5, 480p text-to-video): 2 dual-stream blocks behind a 2-block
token refiner, a Qwen2.5-VL language model and a ByT5 text encoder, a 16x spatial and 4x temporal VAE.

The pipeline wraps every prompt in Qwen's chat template with a fixed system message and drops the first
108 tokens (``prompt_template_encode_start_idx``) of the third-from-last hidden state, padded to 1000
tokens past them. The tokenizer here makes that system part exactly 108 tokens (each word one token, and
each run of 8 spaces one, as in Qwen's vocabulary), so that the crop keeps the prompt's own tokens. ByT5
encodes only the text the prompt quotes ("..." or “...”), to render glyphs, padded to 256 tokens; a
prompt without quotes gets zeros, masked out. Besides the text, the transformer takes 729 image tokens
(the image-to-video model's SigLIP features), zeros and masked out for text-to-video: about 2000 text
tokens in every attention, whatever the video's size. The transformer projects ByT5's output through a
2048-wide MLP whatever its own width (4.2M of its 4.5M parameters here).

Guidance is the ``guider`` component (diffusers' ``ClassifierFreeGuidance``, saved with the pipeline),
not a call argument: true classifier-free guidance against ``negative_prompt`` (default the empty
prompt), one extra transformer pass per step, at the released 480p scale of 6 (1 turns it off). The
call takes no ``callback_on_step_end``. Without a size it makes 480x848 (a 16:9 bucket of
``target_size``), 121 frames, in 50 steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.llm import QWEN3_CHAT_TEMPLATE, QWEN_CONTROL_TOKENS, qwen2_tokenizer, template_words
from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER
from tiny_pipelines.tokenizers import WORDS

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextModel, Qwen2Tokenizer, T5EncoderModel

LATENT_CHANNELS = 8
TEXT_HIDDEN = 32

# HunyuanVideo15Pipeline's system message (``system_message``), as the pipeline renders it: the source's
# line continuations leave runs of 9 spaces before each numbered item.
SYSTEM_MESSAGE = (
    "You are a helpful assistant. Describe the video by detailing the following aspects:         "
    "1. The main content and theme of the video.         "
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.         "
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.         "
    "4. background environment, light, style and atmosphere.         "
    "5. camera angles, movements, and transitions used in the video."
)
# Qwen's pre-tokenizer splits a run of 9 spaces before a digit into 8 spaces and 1, and Qwen's vocabulary
# has the 8-space run as one token.
_TEMPLATE_WORDS: tuple[str, ...] = (*template_words(SYSTEM_MESSAGE), "system", "user", "assistant", " " * 8)

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels; the RoPE axes (time, height, width) sum to the head dim. The input is the
    # latents, the conditioning latents (zeros for text-to-video) and their mask, stacked on channels.
    # target_size (the default size's scale, in pixels) is the released 480p model's; task_type is read by
    # nothing.
    "transformer": {
        "in_channels": 2 * LATENT_CHANNELS + 1,
        "out_channels": LATENT_CHANNELS,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "num_refiner_layers": 2,
        "mlp_ratio": 2.0,
        "patch_size": 1,
        "patch_size_t": 1,
        "text_embed_dim": TEXT_HIDDEN,
        "text_embed_2_dim": T5_ENCODER["d_model"],
        "image_embed_dim": 16,
        "rope_axes_dim": (4, 6, 6),
        "target_size": 640,
        "task_type": "t2v",
    },
    # Five levels, four of them upsampling: 16x spatial, 4x temporal, so 1 + 4k frames of 64x64 pixels
    # -> k + 1 latent frames of 4x4.
    "vae": {
        "latent_channels": LATENT_CHANNELS,
        "block_out_channels": (8, 8, 8, 8, 8),
        "layers_per_block": 1,
        "spatial_compression_ratio": 16,
        "temporal_compression_ratio": 4,
        "scaling_factor": 0.8,
    },
    # Three layers: the pipeline reads the third hidden state from the end, the first layer's output. The
    # multimodal RoPE sections (time, height, width) sum to half the head dim.
    "text_encoder": {
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    },
    # ByT5 is a T5 over bytes.
    "text_encoder_2": T5_ENCODER,
    # The released 480p text-to-video scheduler and guidance.
    "scheduler": {"shift": 5.0},
    "guider": {"guidance_scale": 6.0},
}

# 16x VAE, 1x1 patches: 64x64 pixels -> a 4x4 token grid; 5 frames -> 2 latent frames. Sizes must be
# multiples of 16 (the pipeline does not check), frame counts 1 + 4k.
SMALL_CALL: Mapping[str, Any] = {"width": 64, "height": 64, "num_frames": 5}


def tokenizer() -> Qwen2Tokenizer:
    # Qwen2.5-VL's chat template renders a system and a user turn as Qwen3's does; padding goes at the end,
    # since the pipeline crops the template off the front.
    return qwen2_tokenizer(
        control_tokens=QWEN_CONTROL_TOKENS,
        words=(*WORDS, *_TEMPLATE_WORDS),
        eos_token="<|im_end|>",
        chat_template=QWEN3_CHAT_TEMPLATE,
        padding_side="right",
    )


def text_encoder(tokenizer: Qwen2Tokenizer, recipe: Mapping[str, Any]) -> Qwen2_5_VLTextModel:
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(
        **recipe,
        vocab_size=len(tokenizer),
        # As released: Qwen has no BOS token in its texts, but names <|endoftext|>.
        bos_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2_5_VLTextModel(config)


def byt5(tokenizer: ByT5Tokenizer, recipe: Mapping[str, Any]) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    # As text_encoders.t5_config, for the byte-level tokenizer.
    config: dict[str, Any] = {
        **recipe,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    return T5EncoderModel(T5Config(**config))


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.guiders.classifier_free_guidance import ClassifierFreeGuidance
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import AutoencoderKLHunyuanVideo15
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15Transformer3DModel
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from transformers import ByT5Tokenizer

    qwen_tokenizer = tokenizer()
    byt5_tokenizer = ByT5Tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: HunyuanVideo15Transformer3DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKLHunyuanVideo15(**recipe["vae"]).eval(),
            "text_encoder": lambda: text_encoder(qwen_tokenizer, recipe["text_encoder"]).eval(),
            "text_encoder_2": lambda: byt5(byt5_tokenizer, recipe["text_encoder_2"]).eval(),
        },
    )
    modules.update(
        tokenizer=qwen_tokenizer,
        tokenizer_2=byt5_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]),
        guider=ClassifierFreeGuidance(**recipe["guider"]),
    )
    return HunyuanVideo15Pipeline(**modules)
