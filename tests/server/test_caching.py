"""A pipeline's cache engines run as one: Wan 2.2's two experts under one request's policy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from cache_engine import CacheEngine, FirstBlockCacheConfig
from cache_engine.session import active_session
from server.models.caching import ModelCache
from tiny_pipelines import tiny_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def wan22() -> Any:
    pipeline = tiny_pipeline("wan22").build()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _calls(pipeline: Any) -> dict[str, int]:
    """Counts each expert's forward calls while the returned dict is alive (hooks removed by the caller)."""
    counts = {"transformer": 0, "transformer_2": 0}
    for name in counts:
        getattr(pipeline, name).register_forward_pre_hook(
            lambda module, args, name=name: counts.__setitem__(name, counts[name] + 1)
        )
    return counts


def _generate(pipeline: Any) -> np.ndarray:
    frames = pipeline(
        prompt="a boat on the sea",
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **tiny_pipeline("wan22").small_call,
    ).frames
    return np.asarray(frames)


def test_both_experts_run_under_the_policy_and_the_stats_are_summed(wan22: Any) -> None:
    reference = _generate(wan22)
    counts = _calls(wan22)
    cache = ModelCache([CacheEngine(wan22.transformer), CacheEngine(wan22.transformer_2)])
    try:
        # Threshold 0: nothing may be reused, so the output must be the uncached one, bit for bit.
        with cache.session(FirstBlockCacheConfig(threshold=0.0), request_id="exact") as run:
            exact = _generate(wan22)
        assert np.array_equal(exact, reference)
        assert run.stats is not None
        assert run.stats.denoiser_calls == counts["transformer"] + counts["transformer_2"]
        assert counts["transformer"] > 0 and counts["transformer_2"] > 0

        # A loose threshold reuses blocks in both experts' steps.
        with cache.session(FirstBlockCacheConfig(threshold=10.0), request_id="loose") as run:
            cached = _generate(wan22)
        assert run.stats is not None and run.stats.blocks_reused > 0
        assert not np.array_equal(cached, reference)
        assert active_session() is None
    finally:
        cache.close()
    # With the engines closed, the pipeline is plain again.
    assert np.array_equal(_generate(wan22), reference)


def test_without_engines_nothing_is_supported_and_no_stats_are_reported(wan22: Any) -> None:
    cache = ModelCache([CacheEngine(wan22.transformer), CacheEngine(wan22.transformer_2)])
    assert cache.installed and "first_block_cache" in cache.supported_methods
    cache.close()
    assert not cache.installed and cache.supported_methods == ()
    with cache.session(FirstBlockCacheConfig(threshold=10.0)) as run:
        pass
    assert run.stats is None
