"""Word-level tokenizers and tiny CLIP / T5 text encoders, built in memory.

Both tokenizers are the real transformers classes (so ``FluxPipeline.save_pretrained`` writes them
and ``from_pretrained`` reads them back offline), with a vocabulary in which every word of
``shapes.dataset.WORDS`` is a single token. Other text still tokenizes, character by character.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

# CLIP's context length; FluxPipeline reads it from the tokenizer and pads every prompt to it.
CLIP_MAX_LENGTH = 77
# The T5 length the model is trained with and must be called with (``max_sequence_length``): the
# pipeline attends to T5's padding, so a longer pad is a different input.
T5_LENGTH = 16
HIDDEN = 64


def clip_tokenizer(words: Iterable[str]) -> CLIPTokenizer:
    """Byte-level BPE over single bytes, plus merges that make each word a single token.

    BPE applies the lowest-ranked pair first, so one word's merges can cut into another's (the
    "an" of "and" splits "triangle"). Words left in pieces get a merge chain over those pieces,
    ranked after every existing merge, which cannot change how any other word is split.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    words = list(words)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    symbols = sorted(ByteLevel.alphabet())
    for symbol in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(symbol, len(vocab))
    merges: dict[tuple[str, str], None] = {}

    def chain(pieces: list[str]) -> None:
        merged = pieces[0]
        for piece in pieces[1:]:
            merges[(merged, piece)] = None
            merged += piece
            vocab.setdefault(merged, len(vocab))

    for word in words:
        chain([*word[:-1], word[-1] + "</w>"])
    while True:
        # Annotated as list[str], but handed to tokenizers' BPE, which takes pairs.
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_MAX_LENGTH)  # type: ignore[arg-type]
        split = [tokenizer.tokenize(word) for word in words]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            return tokenizer
        for pieces in split:
            chain(pieces)


def t5_tokenizer(words: Iterable[str]) -> T5Tokenizer:
    """Unigram: one piece per word, then single characters as the fallback."""
    from transformers import T5Tokenizer

    scores: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    scores.update(("▁" + word, -1.0) for word in words)
    for char in string.printable:
        if not char.isspace():
            scores.setdefault("▁" + char, -3.0)
            scores.setdefault(char, -4.0)
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0, model_max_length=512)


def clip_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """Two layers of 64 channels. pad = eos, because the pipeline pools at the first end-of-text."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        projection_dim=HIDDEN,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=HIDDEN,
        d_kv=16,
        d_ff=2 * HIDDEN,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)
