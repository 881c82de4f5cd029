"""Cache memory: each session reports the peak bytes its state held, counted by the session alone."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

import cache_engine as ce
from cache_engine.session import held_bytes
from tests.cache_engine.support import METHODS, our_config, session_run, tiny


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.linear(hidden_states)


class _Stack(nn.Module):
    """The smallest model the engine takes: a list of blocks, each [batch, tokens, width] to the same."""

    def __init__(self, depth: int = 3, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def _peak(tokens: int, steps: int = 3) -> int:
    torch.manual_seed(0)
    model = _Stack()
    engine = ce.CacheEngine(model)
    # Threshold 0 computes every step and keeps what a skip would need.
    with torch.no_grad(), engine.session(ce.FirstBlockCacheConfig(threshold=0.0)) as session:
        for _ in range(steps):
            model(torch.randn(2, tokens, 8))
    return session.stats.peak_bytes


def test_first_block_cache_holds_two_residuals() -> None:
    # Between steps: the head block's residual and what the blocks after it added; fp32 [2, 16, 8].
    assert _peak(16) == 2 * 2 * 16 * 8 * 4


def test_the_peak_grows_with_the_tokens_held() -> None:
    assert _peak(32) == 2 * _peak(16)


def test_no_policy_holds_nothing() -> None:
    tp = tiny("flux", "distilled")
    engine = ce.CacheEngine(tp.pipe.transformer)
    _, stats = session_run(engine, tp, None)
    assert stats.peak_bytes == 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reports_the_state_it_kept(method: str) -> None:
    tp = tiny("wan", "separate")
    engine = ce.CacheEngine(tp.pipe.transformer)
    held: list[int] = []
    with engine.session(our_config(method, tp)) as session:
        # The state after the last denoiser call is one of the points the peak was taken over.
        transformer = tp.pipe.transformer
        handle = transformer.register_forward_hook(lambda *_: held.append(session.state_bytes))
        try:
            pipe: Any = tp.pipe
            pipe(**tp.call_kwargs, generator=torch.Generator().manual_seed(0))
        finally:
            handle.remove()
    assert session.stats.peak_bytes >= max(held) > 0
    assert session.state_bytes == 0  # dropped with the session


def test_a_storage_counts_once_however_it_is_reached() -> None:
    base = torch.zeros(10, 10)

    class State:
        __slots__ = ("factors", "view")

        def __init__(self) -> None:
            self.view = base[2:]  # a view keeps its whole storage alive
            self.factors = {0: base, 1: torch.zeros(3, dtype=torch.float64)}

    assert held_bytes([State(), (base, [base[:1]])]) == 10 * 10 * 4 + 3 * 8


def test_two_transformers_add_their_peaks() -> None:
    one = ce.SessionStats("first_block_cache", 1, 1, 0, 2, 0, 0, 0, peak_bytes=100)
    assert (one + dataclasses.replace(one, peak_bytes=50)).peak_bytes == 150
