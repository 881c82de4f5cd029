"""Building blocks of the per-model cache presets."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache_engine import TaylorSeerCacheConfig


def taylorseer_lite(interval: int) -> TaylorSeerCacheConfig:
    """TaylorSeer lite (blocks skipped, ``proj_out`` extrapolated) recomputing every ``interval`` steps."""
    import torch

    from cache_engine import TaylorSeerCacheConfig

    # float32 Taylor factors: bfloat16 ones lose the small step-to-step differences on CPU.
    return TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=3,
        max_order=1,
        taylor_factors_dtype=torch.float32,
        use_lite_mode=True,
    )
