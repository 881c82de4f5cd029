"""Every dataset word is one token for both tokenizers, and training's short CLIP padding is exact."""

from __future__ import annotations

import torch

from shapes import dataset, text
from shapes.denoiser import Denoiser, token_ids
from shapes.export import build_pipeline
from shapes.vae import new_vae


def test_each_word_is_one_token() -> None:
    clip, t5 = text.clip_tokenizer(), text.t5_tokenizer()
    for word in dataset.WORDS:
        assert len(clip.tokenize(word)) == 1, word
        assert len(t5.tokenize(word)) == 1, word


def test_unknown_words_still_tokenize() -> None:
    clip, t5 = text.clip_tokenizer(), text.t5_tokenizer()
    assert len(clip.tokenize("zebra")) > 1
    assert t5.unk_token_id not in t5("zebra").input_ids


def test_training_embeddings_equal_the_pipelines() -> None:
    """The trainer pads CLIP to 16, the pipeline to 77: causal attention makes them the same."""
    torch.manual_seed(0)
    model = Denoiser(0).eval()
    pipe = build_pipeline(model, new_vae(0))
    prompts = [
        "a small red circle on a blue background",
        "",
        "a large black star at the top on a white background",
    ]
    clip_ids, t5_ids = token_ids(prompts)
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=16)
        assert torch.equal(pooled, model.text_encoder(clip_ids).pooler_output)
        assert torch.equal(prompt_embeds, model.text_encoder_2(t5_ids).last_hidden_state)
