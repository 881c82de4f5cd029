"""Stats against an independent count of what really ran.

Counters are installed as the instance ``forward`` of the denoiser, of every block and of every
attention module before the CacheEngine exists, so the engine's dispatchers wrap them: a call the
cache serves never reaches a counter.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import cache_engine as ce
from tests.cache_engine.pipelines import FAMILY_INFO, run
from tests.cache_engine.support import METHODS, ForwardCounter, named, our_config, tiny


class _DenoiserCalls:
    """Per denoiser call: the batch it was given, the batch that really ran, and what ran inside."""

    def __init__(
        self, transformer: torch.nn.Module, blocks: list[ForwardCounter], attention: list[ForwardCounter]
    ):
        self.calls: list[dict[str, Any]] = []
        self._blocks, self._attention = blocks, attention
        inner: list[int] = []
        original = transformer.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            inner.append(int(kwargs["hidden_states"].size(0)))
            return original(*args, **kwargs)

        transformer.forward = forward
        self._inner = inner

        # torch's module hooks run outside the forward, so outside the engine's dispatcher.
        def before(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.calls.append(
                {
                    "batch": int(kwargs["hidden_states"].size(0)),
                    "inner": len(inner),
                    "blocks": self._total(self._blocks),
                    "attention": self._total(self._attention),
                }
            )

        def after(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            call = self.calls[-1]
            ran = inner[call["inner"] :]
            call["ran_batch"] = ran[0] if ran else 0
            call["blocks"] = self._total(self._blocks) - call["blocks"]
            call["attention"] = self._total(self._attention) - call["attention"]

        transformer.register_forward_pre_hook(before, with_kwargs=True)
        transformer.register_forward_hook(after, with_kwargs=True)

    @staticmethod
    def _total(counters: list[ForwardCounter]) -> int:
        return sum(counter.calls for counter in counters)


def _patterns(family: str) -> tuple[list[str], list[str]]:
    info = FAMILY_INFO[family]
    blocks = [rf"{re.escape(name)}\.\d+" for name in info.block_lists]
    attention = [re.escape(p).replace(re.escape("{i}"), r"\d+") for p in info.attention_modules]
    return blocks, attention


@pytest.mark.parametrize("method", [None, *METHODS])
@pytest.mark.parametrize(
    ("family", "cfg"), [("flux", "separate"), ("wan", "separate"), ("cogvideox", "batched")]
)
def test_stats_match_an_independent_count(family: str, cfg: str, method: str | None) -> None:
    tp = tiny(family, cfg)
    transformer = tp.pipe.transformer
    block_patterns, attention_patterns = _patterns(family)
    blocks = [ForwardCounter(m) for m in named(transformer, block_patterns).values()]
    attention = [ForwardCounter(m) for m in named(transformer, attention_patterns).values()]
    denoiser = _DenoiserCalls(transformer, blocks, attention)

    engine = ce.CacheEngine(transformer)
    try:
        assert len(engine.layout.blocks) == len(blocks)
        assert len(engine.layout.attention) == len(attention)
        config = None if method is None else our_config(method, tp)
        with engine.session(config) as session:
            run(tp)
        stats = session.stats
    finally:
        engine.close()

    calls = len(denoiser.calls)
    assert stats.method == (None if method is None else ce.method_name(config))
    assert stats.denoiser_calls == calls
    assert stats.blocks_computed == sum(c.calls for c in blocks)
    assert stats.attention_computed == sum(c.calls for c in attention)
    assert stats.blocks_computed + stats.blocks_reused == calls * len(blocks)
    assert stats.attention_computed + stats.attention_reused == calls * len(attention)

    # A step counts as computed when the model ran in full: the whole batch, every block and every
    # attention module.
    full = [
        call["ran_batch"] == call["batch"]
        and call["blocks"] == len(blocks)
        and call["attention"] == len(attention)
        for call in denoiser.calls
    ]
    assert stats.steps_computed == sum(full)
    assert stats.steps_cached == calls - sum(full)
    if method is None:
        assert stats.steps_cached == stats.blocks_reused == stats.attention_reused == 0
    else:
        assert stats.steps_cached > 0
