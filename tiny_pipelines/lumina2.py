"""Tiny Lumina2Pipeline (Lumina-Image 2.0): a single-stream transformer (2 context-refiner, 2
noise-refiner and 2 main blocks), a Gemma 2 text encoder, FLUX.1's kind of VAE with 8x downsampling.

The pipeline prefixes every prompt with its system prompt and ``" <Prompt Start> "``, pads it to
``max_sequence_length`` (256) Gemma tokens and reads the text encoder's second-to-last hidden state; the
transformer refines the caption under its mask, then joins its unpadded tokens and the image tokens in
one sequence. The tokenizer here has each word of the system prompt as one token, as Gemma's has.

The pipeline fixes ``vae_scale_factor`` at 8 whatever the VAE, so the VAE here downsamples 8x (four
resolutions), or images would come out at another size than asked. Guidance is classifier-free (a second
transformer pass on the negative prompt, the empty one by default), on when ``guidance_scale`` > 1 (the
default is 4), with Lumina's norm rescaling (``cfg_normalization``, on by default) and truncation
(``cfg_trunc_ratio``).

Sana conditions on Gemma 2 too: it builds its tokenizer and text encoder with ``gemma_tokenizer`` and
``gemma2_text_encoder`` from here.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.flux import IMAGE_VAE
from tiny_pipelines.llm import template_words
from tiny_pipelines.seeding import seeded
from tiny_pipelines.tokenizers import WORDS, merge_chain

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import Gemma2Model, GemmaTokenizer

# Lumina2Pipeline.system_prompt and the marker it puts before the prompt, copied: their words join the
# vocabulary.
SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts. <Prompt Start> "
)

# Gemma's special tokens, at Gemma's ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4.
GEMMA_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")

TEXT_HIDDEN = 32

# Two layers, 2 query heads sharing one key/value head of 16 channels. The attention scale is the
# released one, 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim); every other layer attends through a
# sliding window wider than any prompt, as released.
GEMMA2_TEXT: Mapping[str, Any] = {
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "max_position_embeddings": 1024,
}

RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 query heads and 1 key/value head of 16 channels (the RoPE axes, caption position, height and
    # width, sum to the head dim), 2x2 patches; two blocks in each of the context refiner, the noise
    # refiner and the main layers. The first RoPE axis covers max_sequence_length (the class's defaults). The
    # sample size only sets the default image size: 8 latents, 64 pixels.
    "transformer": {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": IMAGE_VAE["latent_channels"],
        "hidden_size": 32,
        "num_layers": 2,
        "num_refiner_layers": 2,
        "num_attention_heads": 2,
        "num_kv_heads": 1,
        "multiple_of": 16,
        "ffn_dim_multiplier": None,
        "norm_eps": 1e-5,
        "scaling_factor": 1.0,
        "axes_dim_rope": (4, 6, 6),
        "axes_lens": (300, 512, 512),
        "cap_feat_dim": TEXT_HIDDEN,
    },
    # Flux's tiny VAE with a fourth resolution, so 8x: 64x64 pixels -> 8x8 latent -> 4x4 tokens.
    "vae": {
        **IMAGE_VAE,
        "block_out_channels": (16, 32, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
    },
    # Two layers: the pipeline reads the first one's output (hidden_states[-2]).
    "text_encoder": GEMMA2_TEXT,
    # Lumina-Image 2.0's scheduler: a fixed shift of 6 (the pipeline computes a mu, which a scheduler
    # without dynamic shifting ignores).
    "scheduler": {"num_train_timesteps": 1000, "shift": 6.0, "use_dynamic_shifting": False},
}

# The pipeline demands multiples of 16 pixels (8x VAE, 2x2 patches); 64 gives a 4x4 token grid.
SMALL_CALL: Mapping[str, Any] = {"width": 64, "height": 64}


def gemma_tokenizer(words: Iterable[str] = WORDS) -> GemmaTokenizer:
    """A ``GemmaTokenizer`` over ``words``: BPE with byte fallback, spaces turned into "▁" and no prefix
    space, as Gemma's; it starts every text with <bos>.

    Each word is one token, alone (at the start of a text) and after a space ("▁word"). The vocabulary
    holds Gemma's special tokens at Gemma's ids, the 256 byte tokens and the printable characters, so
    any other text tokenizes character by character, or byte by byte.
    """
    from tokenizers import models
    from transformers import GemmaTokenizer

    vocab: dict[str, int] = {token: index for index, token in enumerate(GEMMA_SPECIAL_TOKENS)}
    vocab.update((f"<0x{byte:02X}>", len(vocab)) for byte in range(256))
    for char in "▁" + string.printable:
        if char != " ":
            vocab.setdefault(char, len(vocab))
    merges: dict[tuple[str, str], None] = {}

    # "▁" only ever starts a piece, so no merge joins the end of one word to the next: a word splits in a
    # text as it splits alone. As in tokenizers.byte_level_bpe, a word cut apart by another word's merges
    # gets a chain of its own.
    forms = [form for word in words for form in (word, "▁" + word)]
    pending = [list(form) for form in forms]
    while pending:
        for pieces in pending:
            merge_chain(pieces, merges, vocab)
        model = models.BPE(
            vocab=dict(vocab), merges=list(merges), unk_token="<unk>", fuse_unk=True, byte_fallback=True
        )
        split = ([token.value for token in model.tokenize(form)] for form in forms)
        pending = [pieces for pieces in split if len(pieces) > 1]
    # Annotated as list[str], but handed to tokenizers' BPE, which takes pairs.
    pairs: list[Any] = list(merges)
    return GemmaTokenizer(vocab=vocab, merges=pairs, add_bos_token=True)


def gemma2_text_encoder(tokenizer: GemmaTokenizer, recipe: Mapping[str, Any]) -> Gemma2Model:
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        **recipe,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return Gemma2Model(config)


def tokenizer() -> GemmaTokenizer:
    return gemma_tokenizer((*WORDS, *template_words(SYSTEM_PROMPT)))


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_lumina2 import Lumina2Transformer2DModel
    from diffusers.pipelines.lumina2.pipeline_lumina2 import Lumina2Pipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    gemma = tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: Lumina2Transformer2DModel(**recipe["transformer"]).eval(),
            "vae": lambda: AutoencoderKL(**recipe["vae"]).eval(),
            "text_encoder": lambda: gemma2_text_encoder(gemma, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(tokenizer=gemma, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]))
    return Lumina2Pipeline(**modules)
