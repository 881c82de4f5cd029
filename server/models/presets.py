"""Building blocks of the per-model cache presets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from cache_engine import TaylorSeerCacheConfig

# From the fastest to the most faithful; every model's presets are keyed by these names.
PresetName = Literal["fast", "balanced", "quality"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)


def taylorseer(interval: int, *, lite: bool) -> TaylorSeerCacheConfig:
    """TaylorSeer recomputing every ``interval`` steps; ``lite`` skips whole blocks and extrapolates
    ``proj_out`` only. The quality sweep measures exactly these configs, so presets picked from it
    are what was measured."""
    import torch

    from cache_engine import TaylorSeerCacheConfig

    # float32 Taylor factors: bfloat16 ones lose the small step-to-step differences on CPU.
    return TaylorSeerCacheConfig(
        cache_interval=interval,
        disable_cache_before_step=3,
        max_order=1,
        taylor_factors_dtype=torch.float32,
        use_lite_mode=lite,
    )


def taylorseer_lite(interval: int) -> TaylorSeerCacheConfig:
    return taylorseer(interval, lite=True)
