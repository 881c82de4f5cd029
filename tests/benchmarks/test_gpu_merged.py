"""``benchmarks.gpu --merged`` measures on a GPU; its measurement runs here on a tiny Flux pipeline, so
that what it compares (latents and decisions, merged against one at a time) is known to hold."""

from __future__ import annotations

from benchmarks import gpu_merged
from tests.cache_engine.support import tiny


def test_merged_requests_are_checked_against_one_at_a_time() -> None:
    tp = tiny("flux", "distilled")
    result = gpu_merged.measure(
        tp.pipe, tp.call_kwargs, requests=len(gpu_merged.POLICIES), max_batch=4, steps=6, size=64
    )
    assert result.decisions_differing == 0
    assert result.largest_relative_difference < 1e-4
    assert result.batch_mean >= 1 and result.alone_images_per_s > 0 and result.merged_images_per_s > 0
    assert "| 64x64 |" in gpu_merged.markdown([result], 4)
