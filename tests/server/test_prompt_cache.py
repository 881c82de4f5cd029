"""The prompt cache on its own: exact keys, bounded bytes, copies in and out, and the per-request tally."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from server.models.prompt_cache import PromptCache


class Encoder:
    """A stand-in pipeline whose encode_prompt counts its runs; the cache only wraps the bound method."""

    def __init__(self) -> None:
        self.runs = 0

    def encode_prompt(self, prompt: Any, device: Any = None, num: int = 1, embeds: Any = None) -> Any:
        self.runs += 1
        value = float(len(str(prompt)))
        return torch.full((num, 4), value), torch.arange(4.0)


def _cached(max_bytes: int = 1 << 20) -> tuple[PromptCache, Encoder]:
    cache, pipeline = PromptCache(max_bytes), Encoder()
    cache.attach(pipeline)  # type: ignore[arg-type]
    return cache, pipeline


def test_the_same_arguments_hit_and_give_equal_tensors_of_their_own() -> None:
    cache, pipeline = _cached()
    with cache.tally() as first:
        a = pipeline.encode_prompt("a cat", device=torch.device("cpu"), num=2)
    with cache.tally() as second:
        b = pipeline.encode_prompt("a cat", device=torch.device("cpu"), num=2)
        pipeline.encode_prompt("a cat", device=torch.device("cpu"), num=1)
    assert (first.hits, first.misses, second.hits, second.misses) == (0, 1, 1, 1)
    assert pipeline.runs == 2 and (cache.hits, cache.misses) == (1, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # What a caller gets is its own: changing it changes nothing kept.
    b[0].add_(1)
    c = pipeline.encode_prompt("a cat", device=torch.device("cpu"), num=2)
    assert torch.equal(c[0], a[0]) and pipeline.runs == 2


def test_a_call_given_tensors_runs_as_it_is() -> None:
    cache, pipeline = _cached()
    for _ in range(2):
        pipeline.encode_prompt("a cat", embeds=torch.zeros(1))
    assert pipeline.runs == 2 and cache.bytes == 0 and (cache.hits, cache.misses) == (0, 0)


def test_the_bytes_are_bounded_and_the_least_recently_used_leaves_first() -> None:
    entry = (1 * 4 + 4) * 4  # a (1, 4) and a (4,) float32 tensor
    cache, pipeline = _cached(max_bytes=2 * entry)
    for prompt in ("a", "b", "a", "c"):  # "a" used again before "c" arrives: "b" leaves
        pipeline.encode_prompt(prompt)
    assert cache.bytes == 2 * entry and pipeline.runs == 3
    pipeline.encode_prompt("a")
    assert pipeline.runs == 3
    pipeline.encode_prompt("b")
    assert pipeline.runs == 4


@pytest.mark.parametrize("max_bytes", [0, -1])
def test_no_bytes_means_no_cache(max_bytes: int) -> None:
    cache, pipeline = _cached(max_bytes=max_bytes)
    original = Encoder.encode_prompt
    assert pipeline.encode_prompt.__func__ is original  # type: ignore[attr-defined]
    assert cache.bytes == 0
