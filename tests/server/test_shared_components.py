"""Components shared by concurrent generations: each tokenizer call encodes with its own padding, and each
autoencoder call decodes with its own cache, whatever another thread asks of the same one at that moment."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from server.models.registry import load_model
from server.models.shared_components import serialize_autoencoders, serialize_tokenizers, tokenizers_of
from tiny_pipelines import tiny_pipeline

PROMPT = ["a red circle on a blue background"]
# Rounds per thread: unguarded, a few dozen of this many cross on a 2-core machine.
ROUNDS = 300
# Decodes per thread: unguarded, most of four threads' cross.
DECODES = 20


def _padded(tokenizer: Any) -> int:
    """The length of a prompt padded to 512 tokens, as Flux's T5 encoding asks for it."""
    ids = tokenizer(PROMPT, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    return int(ids.input_ids.shape[1])


def test_padding_asked_in_one_thread_is_kept_while_another_asks_for_other_padding() -> None:
    """The calls of Flux's own T5 encoding (padded to 512, then to the longest to warn of truncation) from
    four threads at once: every padded call is 512 tokens long."""
    pipeline = tiny_pipeline("flux").build()
    assert serialize_tokenizers(pipeline) == 2
    tokenizer = pipeline.tokenizer_2
    lengths: list[int] = []

    def padded() -> None:
        lengths.extend(_padded(tokenizer) for _ in range(ROUNDS))

    def longest() -> None:
        for _ in range(ROUNDS):
            tokenizer(PROMPT, padding="longest", return_tensors="pt")

    threads = [threading.Thread(target=target) for target in (padded, longest, padded, longest)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(lengths) == 2 * ROUNDS and set(lengths) == {512}


def test_a_call_waits_while_another_thread_encodes() -> None:
    """While one thread holds a tokenizer, another's call of it waits; it finishes once let go."""
    pipeline = tiny_pipeline("flux").build()
    serialize_tokenizers(pipeline)
    tokenizer = pipeline.tokenizer_2
    lock = tokenizer.__dict__["_ditcache_tokenizer_lock"]
    lengths: list[int] = []
    waiter = threading.Thread(target=lambda: lengths.append(_padded(tokenizer)))
    with lock:
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not lengths
    waiter.join(60)
    assert lengths == [512]


def test_a_tokenizer_shared_by_two_pipelines_keeps_one_lock() -> None:
    first = tiny_pipeline("flux").build()
    second = tiny_pipeline("flux").build()
    second.tokenizer_2 = first.tokenizer_2
    serialize_tokenizers(first)
    lock = first.tokenizer_2.__dict__["_ditcache_tokenizer_lock"]
    assert serialize_tokenizers(second) == 2
    assert second.tokenizer_2.__dict__["_ditcache_tokenizer_lock"] is lock
    # Guarded once: the method wraps the original, not another guard.
    assert first.tokenizer_2._encode_plus.__wrapped__ == type(first.tokenizer_2)._encode_plus.__get__(
        first.tokenizer_2
    )


def test_a_video_autoencoder_decodes_each_call_with_its_own_cache() -> None:
    """Wan's autoencoder decodes frame by frame through a cache it keeps on itself: four threads decoding
    four latents at once each get what the latent decodes to alone."""
    pipeline = tiny_pipeline("wan").build()
    assert serialize_autoencoders(pipeline) == 1
    vae = pipeline.vae
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, vae.config.z_dim, 2, 8, 8, generator=generator) for _ in range(4)]
    with torch.no_grad():
        alone = [vae.decode(latent).sample for latent in latents]
    wrong: list[int] = []

    def decode(index: int) -> None:
        with torch.no_grad():
            for _ in range(DECODES):
                if not torch.equal(vae.decode(latents[index]).sample, alone[index]):
                    wrong.append(index)

    threads = [threading.Thread(target=decode, args=(index,)) for index in range(len(latents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


@pytest.mark.parametrize(("family", "count"), [("flux", 2), ("sd3", 3), ("wan", 1)])
def test_a_loaded_model_guards_every_tokenizer_and_its_autoencoder(
    tmp_path: Path, family: str, count: int
) -> None:
    """Loaded from a folder through diffusers' from_pretrained, as the server loads it."""
    folder = tmp_path / family
    tiny_pipeline(family).build().save_pretrained(folder)
    model = load_model(str(folder), cache_dir=tmp_path / "cache")
    tokenizers = list(tokenizers_of(model.pipeline))
    assert len(tokenizers) == count
    assert all("_ditcache_tokenizer_lock" in tokenizer.__dict__ for tokenizer in tokenizers)
    assert "_ditcache_autoencoder_lock" in model.pipeline.vae.__dict__
