"""Tiny SkyReelsV2Pipeline (text to video): 4 blocks, a UMT5 text encoder, Wan 2.1's causal 3D VAE.

SkyReels-V2 is a Wan 2.1 fine-tune: ``SkyReelsV2Transformer3DModel`` takes Wan's configuration (plus
the diffusion-forcing options, off for text to video), and the pipeline is Wan's, with SkyReels' defaults
(544x960, 97 frames, ``guidance_scale`` 6.0, flow shift 8). So the VAE, text encoder and transformer
shapes are ``wan``'s. ``guidance_scale`` > 1 is true classifier-free guidance, a second transformer pass
on the negative prompt (the empty prompt unless one is given). Prompts are padded to
``max_sequence_length`` (512) tokens.

The pipeline cleans prompts with ``ftfy``, unguarded (Wan's own pipeline skips ``ftfy`` when it is not
installed): without ``ftfy`` a call with a text prompt fails with ``NameError: name 'ftfy' is not
defined``, and only calls that pass ``prompt_embeds`` (and, with guidance, ``negative_prompt_embeds``)
work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import T5_ENCODER, t5_config
from tiny_pipelines.tokenizers import t5_tokenizer
from tiny_pipelines.wan import RECIPE as WAN_RECIPE
from tiny_pipelines.wan import TRANSFORMER as WAN_TRANSFORMER

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # Wan 2.1's tiny transformer (4 blocks, 2 heads of 16 channels, 2x2 spatial patches), without the
    # frame-rate embedding and with one frame per causal block, as SkyReels' text-to-video models.
    "transformer": {**WAN_TRANSFORMER, "inject_sample_info": False, "num_frame_per_block": 1},
    # 8x spatial and 4x temporal compression, as in Wan 2.1.
    "vae": WAN_RECIPE["vae"],
    "text_encoder": T5_ENCODER,
    # SkyReels-V2's text-to-video scheduler (its image-to-video models shift by 5).
    "scheduler": {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 8.0},
}

# The pipeline demands multiples of 16 pixels (8x VAE, 2x2 patches) and 4k + 1 frames (others are
# rounded down to that): 5 frames of 32x32 -> 2 latent frames of 4x4 -> 2 frames of 2x2 tokens.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32, "num_frames": 5}


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
    from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2Transformer3DModel
    from diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2 import SkyReelsV2Pipeline
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: SkyReelsV2Transformer3DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKLWan(**recipe["vae"]).eval(),
            "text_encoder": lambda: UMT5EncoderModel(
                UMT5Config(**t5_config(tokenizer, recipe["text_encoder"]))
            ).eval(),
        },
    )
    modules.update(tokenizer=tokenizer, scheduler=UniPCMultistepScheduler(**recipe["scheduler"]))
    return SkyReelsV2Pipeline(**modules)
