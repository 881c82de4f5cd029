"""Tiny Flux2KleinPipeline: 2 double-stream and 2 single-stream blocks, a Qwen3 text encoder.

FLUX.2 [dev] (``Flux2Pipeline``) conditions on Mistral Small 3 through a ``PixtralProcessor``, and
that processor cannot be built without torchvision, which this project does not depend on. FLUX.2
[klein] (``Flux2KleinPipeline``) drives the same ``Flux2Transformer2DModel`` and ``AutoencoderKLFlux2``
from Qwen3 and its tokenizer (``Qwen2TokenizerFast``, in transformers 5 another name for
``Qwen2Tokenizer``), which build offline. This is the undistilled Klein: true classifier-free
guidance against the empty prompt, which ``guidance_scale`` > 1 turns on (there is no negative
prompt argument and no embedded guidance).

The pipeline stacks the text encoder's hidden states 9, 18 and 27 unless a call names others, so the
Qwen3 here has 27 layers, each 32 channels wide (a tenth of a second over 512 tokens), where the other
tiny text encoders have two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.flux import FLOW_MATCH_SCHEDULER
from tiny_pipelines.llm import QWEN3_CHAT_TEMPLATE, qwen2_tokenizer
from tiny_pipelines.seeding import seeded
from tiny_pipelines.tokenizers import WORDS

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import Qwen2Tokenizer, Qwen3ForCausalLM

# Flux2KleinPipeline's default text_encoder_out_layers: the text encoder needs this many layers.
TEXT_ENCODER_LAYERS = 27
# The layers' outputs are stacked along channels, so the transformer's text input is three times as wide.
_STACKED_LAYERS = 3
TEXT_HIDDEN = 32
LATENT_CHANNELS = 8

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels; the four RoPE axes (time, height, width, text position) sum to the head
    # dim. in_channels is 4x the VAE's latent channels: Flux2 packs 2x2 latent patches into one token.
    "transformer": {
        "patch_size": 1,
        "in_channels": 4 * LATENT_CHANNELS,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": _STACKED_LAYERS * TEXT_HIDDEN,
        "timestep_guidance_channels": 32,
        "axes_dims_rope": (4, 4, 4, 4),
        "guidance_embeds": False,
    },
    # Three resolutions, so 4x downsampling: 32x32 pixels -> 8x8 latent -> 4x4 tokens after packing.
    "vae": {
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
        "sample_size": 64,
    },
    "text_encoder": {
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": TEXT_ENCODER_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    "scheduler": FLOW_MATCH_SCHEDULER,
}

# The pipeline wants multiples of 8 pixels (4x VAE, 2x2 packing); 32 gives a 4x4 token grid.
SMALL_CALL: Mapping[str, Any] = {"width": 32, "height": 32}


def tokenizer() -> Qwen2Tokenizer:
    # Qwen3 ends a turn with <|im_end|> and pads with <|endoftext|>.
    return qwen2_tokenizer(
        control_tokens=("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
        words=(*WORDS, "user", "assistant"),
        eos_token="<|im_end|>",
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def text_encoder(tokenizer: Qwen2Tokenizer, recipe: Mapping[str, Any]) -> Qwen3ForCausalLM:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **recipe,
        vocab_size=len(tokenizer),
        # As released: Qwen has no BOS token in its texts, but names <|endoftext|>.
        bos_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen3ForCausalLM(config)


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    qwen_tokenizer = tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: Flux2Transformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKLFlux2(**recipe["vae"]).eval(),
            "text_encoder": lambda: text_encoder(qwen_tokenizer, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=qwen_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]))
    return Flux2KleinPipeline(**modules, is_distilled=False)
