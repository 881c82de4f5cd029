"""Tiny HunyuanVideoImageToVideoPipeline: HunyuanVideo-I2V (``token_replace``) and HunyuanVideo-I2V-33ch
(``latent_concat``, below), on the tiny HunyuanVideo's VAE, CLIP text encoder and transformer shape.

The image-to-video checkpoints are weights of their own. Their Llama text encoder is a LLaVA: it reads the
prompt template with the image's CLIP vision tokens in place of its ``<image>`` token, and the pipeline keeps
both the image's and the prompt's hidden states. The template's numbers are fixed: 576 image tokens (a
24x24 patch grid, LLaVA-1.5's at 336 pixels; here 48 pixels in 2x2 patches) at positions 5 to 581, and
103 tokens before the prompt, which this tokenizer makes with ``<image>`` one token, as Llama 3's does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.hunyuan_video import LATENT_CHANNELS, LLAMA, llama_tokenizer
from tiny_pipelines.hunyuan_video import RECIPE as HUNYUAN_VIDEO_RECIPE
from tiny_pipelines.hunyuan_video import SMALL_CALL as HUNYUAN_VIDEO_SMALL_CALL
from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import clip_text_model
from tiny_pipelines.tokenizers import clip_tokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import LlamaTokenizerFast

IMAGE_TOKEN = "<image>"
# 48x48 pixels in 2x2 patches: the 576 tokens the template makes room for, and the class token, which the
# LLaVA drops ("default" feature selection).
VISION: Mapping[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "projection_dim": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 48,
    "patch_size": 2,
}

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # HunyuanVideo-I2V: the image's latents replace the first latent frame's tokens, which are modulated
    # at timestep 0; guidance is embedded, as in the text model.
    "transformer": {**HUNYUAN_VIDEO_RECIPE["transformer"], "image_condition_type": "token_replace"},
    "vae": HUNYUAN_VIDEO_RECIPE["vae"],
    # LLaVA's own choices: the vision tower's second-to-last layer, projected by a GELU MLP.
    "text_encoder": {
        "text_config": LLAMA,
        "vision_config": VISION,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
    },
    "text_encoder_2": HUNYUAN_VIDEO_RECIPE["text_encoder_2"],
    # CLIP's preprocessing at the vision tower's size, on PIL (without torchvision, as wan_i2v's).
    "image_processor": {"size": VISION["image_size"], "crop_size": VISION["image_size"]},
    "scheduler": HUNYUAN_VIDEO_RECIPE["scheduler"],
}

SMALL_CALL: Mapping[str, Any] = HUNYUAN_VIDEO_SMALL_CALL


def image_tokenizer() -> LlamaTokenizerFast:
    """The tiny Llama tokenizer over the image-to-video template, ``<image>`` one token."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    return llama_tokenizer(template=str(DEFAULT_PROMPT_TEMPLATE["template"]), special_tokens=[IMAGE_TOKEN])


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoTransformer3DModel,
    )
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import (
        HunyuanVideoImageToVideoPipeline,
    )
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tokenizer = image_tokenizer()
    tokenizer_2 = clip_tokenizer()
    token_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    encoder = recipe["text_encoder"]
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert isinstance(image_token, int)
    llava_options: dict[str, Any] = {
        key: value for key, value in encoder.items() if key not in ("text_config", "vision_config")
    }
    # The pipeline pads the image-expanded prompt with it, read from the top of the config, where the
    # published LLaVA's config.json has it.
    llava_options["pad_token_id"] = tokenizer.pad_token_id

    def llava() -> LlavaForConditionalGeneration:
        config = LlavaConfig(
            text_config=LlamaConfig(**encoder["text_config"], vocab_size=len(tokenizer), **token_ids),
            vision_config=CLIPVisionConfig(**encoder["vision_config"]),
            image_token_index=image_token,
            **llava_options,
        )
        return LlavaForConditionalGeneration(config)

    modules = seeded(
        seed,
        {
            "transformer": lambda: HunyuanVideoTransformer3DModel(**recipe["transformer"]),
            "vae": lambda: AutoencoderKLHunyuanVideo(**recipe["vae"]),
            "text_encoder": llava,
            "text_encoder_2": lambda: clip_text_model(tokenizer_2, recipe["text_encoder_2"]),
        },
    )
    modules.update(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        image_processor=CLIPImageProcessorPil(**recipe["image_processor"]),
        scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]),
    )
    return HunyuanVideoImageToVideoPipeline(**modules)


# HunyuanVideo-I2V-33ch: the image's latents (on the first latent frame, zero elsewhere) and a mask of them
# ride beside the noise (2 x latent channels + 1), no guidance embedding (guidance is true CFG against a
# negative prompt), and the pipeline drops the first 4 frames it decodes.
CONCAT_RECIPE: Mapping[str, Mapping[str, Any]] = {
    **RECIPE,
    "transformer": {
        **HUNYUAN_VIDEO_RECIPE["transformer"],
        "in_channels": 2 * LATENT_CHANNELS + 1,
        "guidance_embeds": False,
        "image_condition_type": "latent_concat",
    },
}

CONCAT_SMALL_CALL: Mapping[str, Any] = SMALL_CALL
concat_build = build
