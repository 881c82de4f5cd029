"""Nothing left behind: a session whose pipeline raised mid-run leaves no state, binding or tensor."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch

import cache_engine as ce
from cache_engine.session import _BRANCH, active_session
from tests.cache_engine.pipelines import run
from tests.cache_engine.support import METHODS, our_config, run_with, session_run, tiny


class Cancelled(Exception):
    """Raised from the step callback, as a cancelled request would stop its pipeline."""


def _raise_at(step: int) -> Callable[..., dict[str, Any]]:
    def callback(pipe: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if index == step:
            raise Cancelled(f"step {index}")
        return {}

    return callback


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _fail_in_session(engine: ce.CacheEngine, tp: Any, config: object, step: int) -> ce.CacheSession:
    with pytest.raises(Cancelled), engine.session(config) as session:
        run_with(tp, callback_on_step_end=_raise_at(step))
    return session


@pytest.mark.parametrize("step", [0, 3])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("family", "cfg"), [("flux", "separate"), ("cogvideox", "batched")])
def test_a_session_that_raised_leaves_nothing_behind(
    uncached: Callable[..., torch.Tensor], family: str, cfg: str, method: str, step: int
) -> None:
    tp = tiny(family, cfg)
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        config = our_config(method, tp)
        fresh, _ = session_run(engine, tp, config)

        session = _fail_in_session(engine, tp, config, step)
        assert session.closed
        assert session.state_size == 0
        assert session.stats.denoiser_calls > 0
        assert active_session() is None
        assert _BRANCH.get() is None

        again, _ = session_run(engine, tp, config)
        assert torch.equal(again, fresh)
        assert torch.equal(run(tp), uncached(family, cfg))
    finally:
        engine.close()


def test_sessions_that_raised_hold_no_memory() -> None:
    tp = tiny("flux", "separate")
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        # The same failure without a session first, so the pipeline's own leftovers (its current
        # timestep, the scheduler's position) are already counted.
        with pytest.raises(Cancelled):
            run_with(tp, callback_on_step_end=_raise_at(3))
        tensors_before = _live_tensors()

        finished = []
        for method in METHODS:
            session = _fail_in_session(engine, tp, our_config(method, tp), 3)
            assert session.stats.blocks_reused + session.stats.attention_reused > 0
            finished.append(weakref.ref(session))
        del session
        assert _live_tensors() == tensors_before
        # The engine keeps no reference to a finished session.
        assert all(ref() is None for ref in finished)
    finally:
        engine.close()
