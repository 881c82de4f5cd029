"""Sessions: bound per thread through a contextvar, state keyed by branch, dropped whatever happens."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import pytest
import torch

import cache_engine as ce
from cache_engine.session import DEFAULT_BRANCH, active_session, branch
from tests.cache_engine.pipelines import run
from tests.cache_engine.support import RigFactory, session_run


def _new_list() -> list[int]:
    return []


@pytest.fixture
def engine(rig: RigFactory) -> ce.CacheEngine:
    return rig("flux", "distilled").engine


def test_bound_only_inside_the_with_block(engine: ce.CacheEngine) -> None:
    assert active_session() is None
    with engine.session(ce.FirstBlockCacheConfig(), request_id="r-1") as session:
        assert active_session() is session
        assert session.request_id == "r-1"
        assert isinstance(session.config, ce.FirstBlockCacheConfig)
        session.state("owner", _new_list).append(1)
        assert session.state_size == 1
    assert active_session() is None
    assert session.closed
    assert session.state_size == 0


def test_unbound_and_emptied_when_the_body_raises(engine: ce.CacheEngine) -> None:
    with pytest.raises(KeyError), engine.session(ce.FirstBlockCacheConfig()) as session:
        session.state("owner", _new_list)
        raise KeyError("boom")
    assert active_session() is None
    assert session.closed and session.state_size == 0


def test_state_is_keyed_by_branch(engine: ce.CacheEngine) -> None:
    owner = object()
    with engine.session(None) as session:
        assert session.branch == DEFAULT_BRANCH
        with branch("cond"):
            cond = session.state(owner, _new_list)
            assert session.state(owner, _new_list) is cond
            with branch("uncond"):
                uncond = session.state(owner, _new_list)
                assert session.branch == "uncond"
            assert session.branch == "cond"
            shared = session.shared_state(owner, _new_list)
        with branch("uncond"):
            assert session.state(owner, _new_list) is uncond
            assert session.shared_state(owner, _new_list) is shared
        assert cond is not uncond
        assert session.state(owner, _new_list) is not cond
        assert session.state_size == 4  # cond, uncond, shared, default

        session.reset()
        assert session.state_size == 0
        assert session.plan.method is None


def test_a_new_thread_does_not_see_the_callers_session(engine: ce.CacheEngine) -> None:
    seen: list[object] = []
    with engine.session(None):
        worker = threading.Thread(target=lambda: seen.append(active_session()))
        worker.start()
        worker.join()
    assert seen == [None]


def test_concurrent_threads_each_see_their_own_session(engine: ce.CacheEngine) -> None:
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, object] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with engine.session(None, request_id=name) as session:
                # Both sessions are bound at this point.
                barrier.wait()
                with branch(name):
                    seen[name] = (active_session() is session, session.branch)
                barrier.wait()
        except BaseException as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert seen == {"a": (True, "a"), "b": (True, "b")}


def test_current_timestep_is_unknown_before_the_first_denoiser_call(engine: ce.CacheEngine) -> None:
    with engine.session(None) as session:
        assert session.current_timestep is None


def test_a_session_acts_only_on_its_own_engines_transformer(
    rig: RigFactory, uncached: Callable[..., torch.Tensor]
) -> None:
    """A session bound for Flux leaves a Wan pipeline run in the same thread uncached."""
    flux, wan = rig("flux", "distilled"), rig("wan", "distilled")
    with flux.engine.session(ce.FirstBlockCacheConfig(threshold=1e9)) as session:
        output = run(wan.tp)
    assert session.stats.denoiser_calls == 0
    assert torch.equal(output, uncached("wan", "distilled"))


def test_stats_are_a_frozen_record(rig: RigFactory) -> None:
    r = rig("flux", "distilled")
    config = ce.FirstBlockCacheConfig(threshold=0.5)
    _, stats = session_run(r.engine, r.tp, config)
    # as_dict is what a caller serialises: every count, under its own name, and the method that ran.
    assert stats.as_dict() == {field.name: getattr(stats, field.name) for field in dataclasses.fields(stats)}
    assert stats.method == ce.method_name(config)
    assert stats.denoiser_calls > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.denoiser_calls = 0  # type: ignore[misc]
