"""Tiny CLIP and T5 text encoders, shared by the families that use them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.tokenizers import CLIP_MAX_LENGTH

if TYPE_CHECKING:
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5Tokenizer,
    )

# Two layers, four heads of 16 channels.
T5_ENCODER: Mapping[str, Any] = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 16,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}

# The pipelines take CLIP's pooled output at the first end-of-text token, so pad = eos.
CLIP_TEXT: Mapping[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "projection_dim": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": CLIP_MAX_LENGTH,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}


def t5_config(tokenizer: T5Tokenizer, recipe: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **recipe,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }


def t5_encoder(tokenizer: T5Tokenizer, recipe: Mapping[str, Any] = T5_ENCODER) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**t5_config(tokenizer, recipe)))


def clip_text_model(tokenizer: CLIPTokenizer, recipe: Mapping[str, Any] = CLIP_TEXT) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**recipe, vocab_size=len(tokenizer)))


def clip_text_model_with_projection(
    tokenizer: CLIPTokenizer, recipe: Mapping[str, Any] = CLIP_TEXT
) -> CLIPTextModelWithProjection:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(**recipe, vocab_size=len(tokenizer)))
