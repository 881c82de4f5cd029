"""The shapes model's tokenizers and tiny CLIP / T5 text encoders: the tiny pipelines' builders
(``tiny_pipelines``) over the words of the shapes captions.

Both tokenizers are the real transformers classes (so ``FluxPipeline.save_pretrained`` writes them
and ``from_pretrained`` reads them back offline), with a vocabulary in which every word of
``shapes.dataset.WORDS`` is a single token. Other text still tokenizes, character by character.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shapes import dataset
from tiny_pipelines import tokenizers
from tiny_pipelines.text_encoders import CLIP_TEXT, T5_ENCODER, clip_text_model

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

# The T5 length the model is trained with and must be called with (``max_sequence_length``): the
# pipeline attends to T5's padding, so a longer pad is a different input.
T5_LENGTH = 16
# Both encoders' width, which the transformer's text projections take.
HIDDEN: int = CLIP_TEXT["hidden_size"]


def clip_tokenizer() -> CLIPTokenizer:
    return tokenizers.clip_tokenizer(dataset.WORDS)


def t5_tokenizer() -> T5Tokenizer:
    # Its model_max_length, the shared default of 512, is what the shipped tokenizer_2 says.
    return tokenizers.t5_tokenizer(dataset.WORDS)


def clip_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """Two layers of 64 channels. pad = eos, because the pipeline pools at the first end-of-text."""
    return clip_text_model(tokenizer)


def t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    """Two layers of 64 channels, from the shared recipe.

    Not ``tiny_pipelines.text_encoders.t5_encoder``, which also sets ``decoder_start_token_id``: an
    encoder never reads it, and without it a new checkpoint's config is the shipped one's.
    """
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        **T5_ENCODER,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)
