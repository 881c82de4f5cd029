"""The reference entry points used alone: ``apply_*`` / ``enable_cache`` on a transformer, then plain
pipeline calls, as code written against diffusers' caching API does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import cache_engine as ce
from cache_engine.hooks import installed_handle
from cache_engine.session import active_session
from tests.cache_engine.pipelines import run
from tests.cache_engine.support import METHODS, our_config, run_with, session_run, tiny

_APPLY: dict[str, Callable[[torch.nn.Module, Any], None]] = {
    "first_block_cache": ce.apply_first_block_cache,
    "taylorseer": ce.apply_taylorseer_cache,
    "taylorseer_lite": ce.apply_taylorseer_cache,
    "pyramid_attention_broadcast": ce.apply_pyramid_attention_broadcast,
    "faster_cache": ce.apply_faster_cache,
}


def _untouched(transformer: torch.nn.Module) -> bool:
    return ce.engine_of(transformer) is None and not any(installed_handle(m) for m in transformer.modules())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("family", "cfg"), [("flux", "separate"), ("cogvideox", "batched")])
def test_state_lasts_one_pipeline_call(
    uncached: Callable[..., torch.Tensor], family: str, cfg: str, method: str
) -> None:
    tp = tiny(family, cfg)
    transformer = tp.pipe.transformer
    config = our_config(method, tp)

    _APPLY[method](transformer, config)
    assert ce.engine_of(transformer) is not None
    assert ce.engine_of(transformer).ambient_config is config  # type: ignore[union-attr]
    first = run(tp)
    second = run(tp)
    ce.disable_cache(transformer)

    # The second call starts from nothing, as the first did: the pipeline's end-of-call reset cleared it.
    assert torch.equal(first, second)
    assert not torch.equal(first, uncached(family, cfg))
    # Disabling takes everything off that enabling put there.
    assert _untouched(transformer)
    assert torch.equal(run(tp), uncached(family, cfg))

    engine = ce.CacheEngine(transformer)
    try:
        in_session, _ = session_run(engine, tp, config)
    finally:
        engine.close()
    assert torch.equal(in_session, first)


def test_enable_twice_is_refused_and_the_first_policy_stays() -> None:
    tp = tiny("flux", "distilled")
    transformer = tp.pipe.transformer
    first = our_config("first_block_cache", tp)
    ce.enable_cache(transformer, first)
    try:
        expected = run(tp)
        with pytest.raises(ValueError, match="already enabled"):
            ce.enable_cache(transformer, our_config("pyramid_attention_broadcast", tp))
        with pytest.raises(ValueError, match="already enabled"):
            ce.apply_first_block_cache(transformer, first)
        assert ce.engine_of(transformer).ambient_config is first  # type: ignore[union-attr]
        assert torch.equal(run(tp), expected)
    finally:
        ce.disable_cache(transformer)
    assert _untouched(transformer)


def test_refused_configs_leave_the_transformer_untouched() -> None:
    tp = tiny("flux", "distilled")
    transformer = tp.pipe.transformer
    with pytest.raises(ValueError, match="unknown cache config"):
        ce.enable_cache(transformer, object())
    assert _untouched(transformer)
    with pytest.raises(ce.UnsupportedMethodError, match="FluxTransformer2DModel"):
        ce.apply_taylorseer_cache(
            transformer, ce.TaylorSeerCacheConfig(cache_identifiers=("no_such_module",))
        )
    assert _untouched(transformer)
    # Disabling what was never enabled is harmless.
    ce.disable_cache(transformer)
    assert _untouched(transformer)


def test_policy_on_a_transformer_with_its_own_engine(uncached: Callable[..., torch.Tensor]) -> None:
    """The model-wide policy applies outside sessions; a session's own policy wins inside it; disabling
    the policy leaves the engine installed, since the reference API did not create it."""
    tp = tiny("flux", "distilled")
    transformer = tp.pipe.transformer
    engine = ce.CacheEngine(transformer)
    try:
        ambient_config = our_config("first_block_cache", tp)
        session_config = our_config("pyramid_attention_broadcast", tp)
        expected_ambient, _ = session_run(engine, tp, ambient_config)
        expected_session, _ = session_run(engine, tp, session_config)

        ce.apply_first_block_cache(transformer, ambient_config)
        assert torch.equal(run(tp), expected_ambient)
        in_session, _ = session_run(engine, tp, session_config)
        assert torch.equal(in_session, expected_session)
        no_policy, _ = session_run(engine, tp, None)
        assert torch.equal(no_policy, uncached("flux", "distilled"))

        ce.disable_cache(transformer)
        assert ce.engine_of(transformer) is engine
        assert torch.equal(run(tp), uncached("flux", "distilled"))
    finally:
        engine.close()


def test_cache_context_names_the_branch() -> None:
    tp = tiny("flux", "distilled")
    transformer = tp.pipe.transformer
    engine = ce.CacheEngine(transformer)
    try:
        with engine.session(None) as session:
            with ce.cache_context(transformer, "uncond"):
                assert active_session() is session
                assert session.branch == "uncond"
                with transformer.cache_context("cond"):
                    assert session.branch == "cond"
                assert session.branch == "uncond"
            assert session.branch == "default"
    finally:
        engine.close()


@pytest.mark.xfail(
    strict=True,
    reason="a model-wide policy's state is cleared by the pipeline's end-of-call reset, which a call "
    "that raises never reaches; the reference behaves the same. Sessions do not have this problem.",
)
def test_a_call_that_raised_under_a_model_wide_policy_leaves_no_state() -> None:
    tp = tiny("flux", "separate")
    transformer = tp.pipe.transformer
    ce.apply_taylorseer_cache(transformer, our_config("taylorseer", tp))
    try:
        fresh = run(tp)

        def cancel(pipe: Any, index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if index == 3:
                raise RuntimeError("cancelled")
            return {}

        with pytest.raises(RuntimeError, match="cancelled"):
            run_with(tp, callback_on_step_end=cancel)
        assert torch.equal(run(tp), fresh)
    finally:
        ce.disable_cache(transformer)
