"""Tiny WanImageToVideoPipeline: Wan 2.1 I2V (the tiny Wan with a CLIP vision encoder and an
image-conditioned transformer), Wan 2.2 I2V A14B (two such experts without the image encoder) and Wan 2.2
TI2V 5B (its text-to-video checkpoint's components, tiny_pipelines.wan, the image as the first latent frame),
below.

Wan 2.1's image-to-video checkpoints are weights of their own, not the text model's: the transformer takes the
noise, a mask of the frames given and the VAE latents of the image (2 x latent channels + the VAE's 4x
temporal compression, 20 input channels here), and attends, besides the prompt, to the image's CLIP tokens
through an attention of their own (``image_dim``, ``added_kv_proj_dim``). The processor splits those tokens
off by counting 512 text tokens, the pipeline's ``max_sequence_length``, so prompts stay padded to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.text_encoders import T5_ENCODER
from tiny_pipelines.wan import LATENT_CHANNELS, components
from tiny_pipelines.wan import RECIPE as WAN_RECIPE
from tiny_pipelines.wan import TI2V_RECIPE as TI2V_RECIPE
from tiny_pipelines.wan import TI2V_SMALL_CALL as TI2V_SMALL_CALL
from tiny_pipelines.wan import TRANSFORMER as WAN_TRANSFORMER

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

# The mask of given frames: one channel per frame of a latent frame (the VAE's temporal compression).
_MASK_CHANNELS = 4
# 32x32 pixels in 4x4 patches: 64 patch tokens and the class token. Its hidden size is the transformer's
# image_dim.
IMAGE_ENCODER: Mapping[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "projection_dim": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 4,
}
_INNER_DIM = WAN_TRANSFORMER["num_attention_heads"] * WAN_TRANSFORMER["attention_head_dim"]

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # Wan 2.1's tiny transformer; the image's CLIP tokens are embedded at the inner width, as the 14B I2V
    # checkpoints do (added_kv_proj_dim is their inner width).
    "transformer": {
        **WAN_TRANSFORMER,
        "in_channels": 2 * LATENT_CHANNELS + _MASK_CHANNELS,
        "image_dim": IMAGE_ENCODER["hidden_size"],
        "added_kv_proj_dim": _INNER_DIM,
    },
    "vae": WAN_RECIPE["vae"],
    "text_encoder": T5_ENCODER,
    "image_encoder": IMAGE_ENCODER,
    # CLIP's own preprocessing (resize, centre crop, its mean and std) at the encoder's size, on PIL: the
    # torchvision backend, where installed, would be another implementation of it.
    "image_processor": {"size": IMAGE_ENCODER["image_size"], "crop_size": IMAGE_ENCODER["image_size"]},
    # Wan 2.1 I2V 480P's scheduler.
    "scheduler": WAN_RECIPE["scheduler"],
}

# Multiples of 16 pixels (8x VAE, 2x2 patches), 4k + 1 frames: 5 frames of 32x32 -> 2 latent frames of 4x4.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32, "num_frames": 5}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    modules = components(
        recipe,
        seed,
        image_encoder=lambda: CLIPVisionModel(CLIPVisionConfig(**recipe["image_encoder"])),
    )
    modules["image_processor"] = CLIPImageProcessorPil(**recipe["image_processor"])
    return WanImageToVideoPipeline(**modules)


# Wan 2.2 I2V A14B: two experts split at boundary_ratio, as the text A14B, and no image encoder: its
# transformer has no image attention (image_dim None), the image conditions through its latents alone, so
# the checkpoint's image_encoder and image_processor are None and the pipeline skips encoding the image.
WAN22_RECIPE: Mapping[str, Mapping[str, Any]] = {
    "transformer": {**WAN_TRANSFORMER, "in_channels": 2 * LATENT_CHANNELS + _MASK_CHANNELS},
    "transformer_2": {**WAN_TRANSFORMER, "in_channels": 2 * LATENT_CHANNELS + _MASK_CHANNELS},
    "vae": WAN_RECIPE["vae"],
    "text_encoder": T5_ENCODER,
    # The I2V A14B's shift and boundary: with 2 steps the timesteps are 999 and 833, with 4 steps 999, 937,
    # 833 and 625, so half the steps go to each expert.
    "scheduler": {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 5.0},
    "pipeline": {"boundary_ratio": 0.9},
}

WAN22_SMALL_CALL: Mapping[str, Any] = SMALL_CALL


def wan22_build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline

    # One seed stream per component name, so the two experts start from different weights. image_encoder
    # and image_processor stay at their default, None, as in the published checkpoint.
    return WanImageToVideoPipeline(**components(recipe, seed), **recipe["pipeline"])


# Wan 2.2 TI2V 5B: the text-to-video checkpoint's recipe (tiny_pipelines.wan), the same components in
# WanImageToVideoPipeline: with expand_timesteps, the image's latents are the first latent frame, whose
# tokens the transformer gets at timestep 0, one timestep per token.
def ti2v_build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline

    return WanImageToVideoPipeline(**components(recipe, seed), **recipe["pipeline"])
