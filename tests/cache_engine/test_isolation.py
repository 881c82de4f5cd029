"""Isolation: a request's output depends only on its own session, whatever runs beside or before it.

Two pipelines share one transformer (and so one CacheEngine) and run in two threads at the same time,
in lockstep: a barrier in the step callback holds each thread until the other has finished the same
step, so every denoising step of one run overlaps the other run.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import cache_engine as ce
from cache_engine.session import active_session
from tests.cache_engine.pipelines import TinyPipeline, clone_with_shared_transformer
from tests.cache_engine.support import (
    LOCKSTEP_TIMEOUT,
    lockstep_callback,
    our_config,
    run_in_lockstep,
    run_with,
    tiny,
)


def _config(method: str | None, tp: TinyPipeline) -> object | None:
    return None if method is None else our_config(method, tp)


def _run_in_session(
    engine: ce.CacheEngine, tp: TinyPipeline, config: object | None, seed: int, **extra: Any
) -> torch.Tensor:
    with engine.session(config):
        return run_with(tp, seed=seed, **extra)


@pytest.mark.parametrize(
    ("family", "cfg", "method_a", "method_b", "seed_b"),
    [
        ("flux", "separate", "first_block_cache", "pyramid_attention_broadcast", 0),
        ("flux", "separate", "faster_cache", None, 0),
        ("wan", "separate", "taylorseer", "faster_cache", 0),
        ("wan", "separate", "pyramid_attention_broadcast", "pyramid_attention_broadcast", 1),
        ("cogvideox", "batched", "faster_cache", "first_block_cache", 0),
        ("cogvideox", "batched", "taylorseer_lite", None, 1),
    ],
)
def test_concurrent_sessions_give_their_sequential_outputs(
    family: str, cfg: str, method_a: str, method_b: str | None, seed_b: int
) -> None:
    first = tiny(family, cfg)
    second = clone_with_shared_transformer(first)
    engine = ce.CacheEngine(first.pipe.transformer)
    try:
        config_a, config_b = _config(method_a, first), _config(method_b, second)
        alone_a = _run_in_session(engine, first, config_a, 0)
        alone_b = _run_in_session(engine, second, config_b, seed_b)
        # The other order too: what ran before a session does not matter.
        assert torch.equal(_run_in_session(engine, first, config_a, 0), alone_a)

        together_a, together_b = run_in_lockstep(engine, [(first, config_a, 0), (second, config_b, seed_b)])
    finally:
        engine.close()

    assert torch.equal(together_a, alone_a)
    assert torch.equal(together_b, alone_b)
    # The pair is a real test: the two sessions produce different outputs.
    assert not torch.equal(alone_a, alone_b)
    assert active_session() is None


def test_a_session_beside_the_reference_api_policy() -> None:
    """A model-wide policy set with the reference API does not reach a session running beside it."""
    first = tiny("flux", "separate")
    second = clone_with_shared_transformer(first)
    transformer = first.pipe.transformer
    engine = ce.CacheEngine(transformer)
    try:
        alone_session = _run_in_session(engine, first, our_config("pyramid_attention_broadcast", first), 0)
        ce.apply_first_block_cache(transformer, our_config("first_block_cache", second))
        alone_ambient = run_with(second)

        barrier = threading.Barrier(2, timeout=LOCKSTEP_TIMEOUT)
        in_lockstep = lockstep_callback(barrier)
        results: dict[str, torch.Tensor] = {}

        def ambient() -> None:
            try:
                results["ambient"] = run_with(second, callback_on_step_end=in_lockstep)
            except BaseException:
                barrier.abort()  # release the session's thread; the missing result fails the test
                raise

        thread = threading.Thread(target=ambient)
        thread.start()
        results["session"] = _run_in_session(
            engine,
            first,
            our_config("pyramid_attention_broadcast", first),
            0,
            callback_on_step_end=in_lockstep,
        )
        thread.join(LOCKSTEP_TIMEOUT)
        ce.disable_cache(transformer)
    finally:
        engine.close()
    assert torch.equal(results["session"], alone_session)
    assert torch.equal(results["ambient"], alone_ambient)
