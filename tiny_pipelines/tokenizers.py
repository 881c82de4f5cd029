"""Tokenizers built in memory from a word list, so that tiny pipelines need no download.

Each is the real transformers class a pipeline expects (``save_pretrained`` writes it and
``from_pretrained`` reads it back offline), with a vocabulary in which every word of the list is one
token. Other text still tokenizes, character by character (or byte by byte), so every prompt
conditions the model.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer, T5Tokenizer

# The words of the tiny models' prompts; the shapes model has its own list (shapes.dataset.WORDS).
WORDS: tuple[str, ...] = tuple(
    [
        "a",
        "an",
        "the",
        "of",
        "on",
        "in",
        "at",
        "with",
        "and",
        "by",
        "under",
        "over",
        "next",
        "to",
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "orange",
        "white",
        "black",
        "gray",
        "pink",
        "brown",
        "small",
        "large",
        "big",
        "tiny",
        "bright",
        "dark",
        "old",
        "new",
        "circle",
        "square",
        "triangle",
        "star",
        "cat",
        "dog",
        "bird",
        "fish",
        "horse",
        "tree",
        "flower",
        "house",
        "car",
        "boat",
        "mountain",
        "river",
        "sea",
        "sky",
        "sun",
        "moon",
        "cloud",
        "city",
        "forest",
        "left",
        "right",
        "top",
        "bottom",
        "center",
        "background",
        "photo",
        "painting",
        "video",
        "walking",
        "running",
        "flying",
        "swimming",
        "sitting",
        "night",
        "day",
        "snow",
        "rain",
    ]
)

# CLIP's context length; the pipelines read it from the tokenizer and pad every prompt to it.
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def merge_chain(pieces: list[str], merges: dict[tuple[str, str], None], vocab: dict[str, int]) -> None:
    """BPE merges that join ``pieces`` left to right into one token, each new piece added to ``vocab``.

    ``merges`` is a dict so that words sharing a prefix share its merges, each kept once, in order.
    """
    merged = pieces[0]
    for piece in pieces[1:]:
        merges[(merged, piece)] = None
        merged += piece
        vocab.setdefault(merged, len(vocab))


def clip_tokenizer(words: Iterable[str] = WORDS) -> CLIPTokenizer:
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

    for word in words:
        merge_chain([*word[:-1], word[-1] + "</w>"], merges, vocab)
    while True:
        # Annotated as list[str], but handed to tokenizers' BPE, which takes pairs.
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_MAX_LENGTH)  # type: ignore[arg-type]
        split = [tokenizer.tokenize(word) for word in words]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            return tokenizer
        for pieces in split:
            merge_chain(pieces, merges, vocab)


def t5_tokenizer(words: Iterable[str] = WORDS) -> T5Tokenizer:
    """Unigram: one piece per word, then single characters as the fallback."""
    from transformers import T5Tokenizer

    scores: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    scores.update(("▁" + word, -1.0) for word in words)
    for char in string.printable:
        if not char.isspace():
            scores.setdefault("▁" + char, -3.0)
            scores.setdefault(char, -4.0)
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0, model_max_length=T5_MAX_LENGTH)


def byte_level_bpe(special_tokens: Iterable[str], words: Iterable[str] = WORDS) -> Tokenizer:
    """A GPT-2-style byte-level BPE (the kind Llama 3, Qwen, GLM and Mistral use), ``words`` one token
    each (with and without a leading space), ``special_tokens`` added whole.

    Wrap it in the tokenizer class a pipeline expects with ``tokenizer_object=``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab: dict[str, int] = {}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    merges: dict[tuple[str, str], None] = {}

    # The byte-level form of each word, as the pre-tokenizer hands it to the model.
    spelled = [byte_level.pre_tokenize_str(form)[0][0] for word in words for form in (word, " " + word)]
    pending = [list(form) for form in spelled]
    while True:
        # As in clip_tokenizer: a word cut apart by another word's merges gets a chain of its own.
        for pieces in pending:
            merge_chain(pieces, merges, vocab)
        tokenizer = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
        split = (tokenizer.model.tokenize(form) for form in spelled)
        pending = [[token.value for token in tokens] for tokens in split if len(tokens) > 1]
        if not pending:
            break
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer
