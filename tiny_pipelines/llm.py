"""Tokenizers for the pipelines conditioned on a decoder-only language model (Qwen, GLM).

Built on ``tokenizers.byte_level_bpe``: the prompt words, and the words of each pipeline's own prompt
template, are one token each, so that a template tokenizes to as many tokens as the released
tokenizer makes of it (QwenImage drops a fixed count of template tokens from every prompt).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tiny_pipelines.tokenizers import WORDS, byte_level_bpe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

# Qwen's chat control tokens; <|endoftext|>, its padding, is the tokenizer's own.
QWEN_CONTROL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")

# Qwen3's chat template, cut down to what the pipelines render: string contents, the generation
# prompt, and the empty thinking block that ``enable_thinking=False`` asks for.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def template_words(*texts: str) -> tuple[str, ...]:
    """The words (runs of letters) of prompt templates, special tokens left out, in first-seen order."""
    words: dict[str, None] = {}
    for text in texts:
        text = re.sub(r"<[^<>\s]*>|\[[^\[\]\s]*\]", " ", text)
        words.update((word, None) for word in re.findall(r"[^\W\d_]+", text))
    return tuple(words)


def qwen2_tokenizer(
    control_tokens: Iterable[str] = QWEN_CONTROL_TOKENS, words: Iterable[str] = WORDS, **kwargs: Any
) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` (the class Qwen 2, 2.5 and 3 ship) over ``words``, ``control_tokens`` whole.

    Built from the vocabulary and merges alone, as ``from_pretrained`` rebuilds it (with Qwen's own
    pre-tokenizer and normaliser), so that the saved tokenizer splits text as this one does.
    """
    from transformers import Qwen2Tokenizer

    model = json.loads(byte_level_bpe((), words).to_str())["model"]
    # Annotated as list[str], but handed to tokenizers' BPE, which takes pairs.
    merges: list[Any] = [tuple(pair) for pair in model["merges"]]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        extra_special_tokens=list(control_tokens),
        **kwargs,
    )


def fast_tokenizer(
    special_tokens: Iterable[str],
    words: Iterable[str] = WORDS,
    prefix: Iterable[str] = (),
    **kwargs: Any,
) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over ``words`` that starts every text with the ``prefix`` tokens.

    The prefix is the tokenizer's post-processor, as GLM's ``[gMASK]<sop>``: it is added wherever
    ``add_special_tokens=True`` and saved with the tokenizer. Prefix tokens are special tokens too.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    prefix = list(prefix)
    tokenizer = byte_level_bpe(dict.fromkeys([*special_tokens, *prefix]), words)
    if prefix:
        ids = [(token, tokenizer.token_to_id(token)) for token in prefix]
        single = " ".join(f"{token}:0" for token in prefix)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{single} $A:0", pair=f"{single} $A:0 $B:1", special_tokens=ids
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)
