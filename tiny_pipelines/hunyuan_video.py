"""Tiny HunyuanVideoPipeline: 2 dual-stream and 2 single-stream blocks, a Llama and a CLIP text encoder."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.seeding import seeded
from tiny_pipelines.text_encoders import CLIP_TEXT, clip_text_model
from tiny_pipelines.tokenizers import WORDS, clip_tokenizer, merge_chain

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import LlamaTokenizerFast

LATENT_CHANNELS = 8
LLAMA_BOS = "<|begin_of_text|>"
LLAMA_EOS = "<|end_of_text|>"
# The chat markers of the pipeline's prompt template, whole tokens as in Llama 3.
LLAMA_SPECIAL_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# 8x spatial and 4x temporal VAE, 2x2 patches: 64x64 pixels -> 8x8 latents -> a 4x4 token grid; 5 frames
# -> 2 latent frames (1 + 4k frames -> k + 1).
SMALL_CALL: Mapping[str, Any] = {"width": 64, "height": 64, "num_frames": 5}

# The pipeline reads the third hidden state from the end (it skips the last two layers), so three layers
# are the fewest for which a layer acts on the prompt at all.
LLAMA: Mapping[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 1024,
}

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 heads of 16 channels; RoPE axes (t, h, w) sum to the head dim. Guidance is an embedded input
    # (HunyuanVideo is guidance-distilled).
    "transformer": {
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "num_single_layers": 2,
        "num_refiner_layers": 1,
        "mlp_ratio": 2.0,
        "patch_size": 2,
        "patch_size_t": 1,
        "guidance_embeds": True,
        "text_embed_dim": LLAMA["hidden_size"],
        "pooled_projection_dim": CLIP_TEXT["hidden_size"],
        "rope_axes_dim": (4, 6, 6),
    },
    "vae": {
        "latent_channels": LATENT_CHANNELS,
        "block_out_channels": (8, 8, 8, 8),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "spatial_compression_ratio": 8,
        "temporal_compression_ratio": 4,
    },
    "text_encoder": LLAMA,
    "text_encoder_2": CLIP_TEXT,
    "scheduler": {"shift": 7.0},
}


def llama_tokenizer(
    words: Iterable[str] = (), *, template: str | None = None, special_tokens: Iterable[str] = ()
) -> LlamaTokenizerFast:
    """A Llama tokenizer (BPE with byte fallback over "▁"-marked words) in which each word of WORDS and of
    the pipeline's prompt template (``template``; by default the text-to-video pipeline's) is one token,
    and each of ``special_tokens`` too, besides the chat markers (the image-to-video template's
    ``<image>``).

    It is built through the class's own constructor, the way ``from_pretrained`` rebuilds it, so that a
    saved copy tokenizes the same. (A byte-level Llama 3 vocabulary would not survive the reload: this
    class always rebuilds a SentencePiece-style pre-tokenizer.) "\\n\\n" and "{}" are single tokens as in
    Llama 3, which makes the template's system part exactly the 95 tokens its ``crop_start`` cuts off.
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import LlamaTokenizerFast

    specials = [*LLAMA_SPECIAL_TOKENS, *special_tokens]
    template = str(DEFAULT_PROMPT_TEMPLATE["template"]) if template is None else template
    for token in specials:
        template = template.replace(token, " ")
    template_words = re.findall(r"[A-Za-z]+", template)
    all_words = dict.fromkeys([*WORDS, *template_words, *words])
    forms = [form for word in all_words for form in ("▁" + word, word)] + ["\n\n", "{}"]

    vocab: dict[str, int] = {"<unk>": 0, LLAMA_BOS: 1, LLAMA_EOS: 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in ["▁", "\n", *(c for c in string.printable if not c.isspace())]:
        vocab.setdefault(char, len(vocab))
    merges: dict[tuple[str, str], None] = {}

    pending = [list(form) for form in forms]
    while True:
        # As in tokenizers.clip_tokenizer: a form cut apart by another's merges gets a chain of its own.
        for pieces in pending:
            merge_chain(pieces, merges, vocab)
        tokenizer = LlamaTokenizerFast(
            vocab=dict(vocab),
            merges=list(merges),
            unk_token="<unk>",
            bos_token=LLAMA_BOS,
            eos_token=LLAMA_EOS,
            pad_token=LLAMA_EOS,
            add_bos_token=True,
            extra_special_tokens=specials,
            # The pipeline crops the template off the front of the sequence, so padding goes at the end.
            padding_side="right",
        )
        model = tokenizer.backend_tokenizer.model
        pending = [[token.value for token in model.tokenize(form)] for form in forms]
        pending = [pieces for pieces in pending if len(pieces) > 1]
        if not pending:
            return tokenizer


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoTransformer3DModel,
    )
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    tokenizer = llama_tokenizer()
    tokenizer_2 = clip_tokenizer()
    llama_ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    modules = seeded(
        seed,
        {
            "transformer": lambda: HunyuanVideoTransformer3DModel(**recipe["transformer"]),
            "vae": lambda: AutoencoderKLHunyuanVideo(**recipe["vae"]),
            "text_encoder": lambda: LlamaModel(LlamaConfig(**recipe["text_encoder"], **llama_ids)),
            "text_encoder_2": lambda: clip_text_model(tokenizer_2, recipe["text_encoder_2"]),
        },
    )
    modules.update(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]),
    )
    return HunyuanVideoPipeline(**modules)
