"""Tiny ZImagePipeline: a single-stream transformer (2 noise-refiner, 2 context-refiner and 2 main blocks),
a Qwen3 text encoder, FLUX.1's kind of VAE.

Z-Image wraps the prompt in Qwen3's chat template (thinking left on, so no empty thinking block), pads it
to ``max_sequence_length`` (512) tokens and keeps the unpadded positions of the text encoder's
second-to-last hidden state, so each prompt conditions the transformer with its own token count. The
tokenizer is FLUX.2 [klein]'s tiny Qwen3 one; the text encoder is a bare ``Qwen3Model``, as released.

The transformer pads its image and caption token runs to multiples of 32 with learned pad tokens (zeros
here, as the class starts them), takes the latents as a list of ``(C, 1, H, W)`` tensors and gets
``(1000 - t) / 1000`` as its time. Guidance is classifier-free, with the empty prompt (or
``negative_prompt``) as the unconditional pass, and is on whenever ``guidance_scale`` > 0 (not > 1):
``pred = cond + guidance_scale * (cond - uncond)``; the default is 5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.flux import IMAGE_VAE
from tiny_pipelines.flux2 import tokenizer
from tiny_pipelines.seeding import seeded

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import Qwen2Tokenizer, Qwen3Model

TEXT_HIDDEN = 32

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels (the RoPE axes, caption/frame, height and width, sum to the head dim), 2x2
    # patches. Each of the three block lists has two blocks: the noise refiner (image tokens, modulated),
    # the context refiner (caption tokens) and the main single-stream layers. The first RoPE axis counts
    # caption positions (the image's start after them), so it covers max_sequence_length and its padding;
    # the axis lengths are the class's defaults.
    "transformer": {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": IMAGE_VAE["latent_channels"],
        "dim": 32,
        "n_layers": 2,
        "n_refiner_layers": 2,
        "n_heads": 2,
        "n_kv_heads": 2,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": TEXT_HIDDEN,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": (4, 6, 6),
        "axes_lens": (1024, 512, 512),
    },
    # Flux's tiny VAE (4x, 8 latent channels); Z-Image decodes with its scale and shift, as FLUX.1 does.
    "vae": IMAGE_VAE,
    # Two layers: the pipeline reads the first one's output (hidden_states[-2]).
    "text_encoder": {
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,
    },
    # Z-Image's released scheduler: a fixed shift of 3 (the pipeline computes a mu, which a scheduler
    # without dynamic shifting ignores).
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
}

# The pipeline demands multiples of 8 pixels (4x VAE, 2x2 patches); 32 gives a 4x4 token grid.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32}


def text_encoder(tokenizer: Qwen2Tokenizer, recipe: Mapping[str, Any]) -> Qwen3Model:
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        **recipe,
        vocab_size=len(tokenizer),
        # As released: Qwen has no BOS token in its texts, but names <|endoftext|>.
        bos_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3Model(config)


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel
    from diffusers.pipelines.z_image.pipeline_z_image import ZImagePipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    qwen_tokenizer = tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: ZImageTransformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKL(**recipe["vae"]).eval(),
            "text_encoder": lambda: text_encoder(qwen_tokenizer, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=qwen_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]))
    return ZImagePipeline(**modules)
