"""How the shapes-model benchmarks name a cache policy and write their numbers: one wording for
``benchmarks.quality --sweep`` and the held-out check of targets alike."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cache_engine import CacheConfig
from server.models.calibration import psnr_to_json
from server.policy.calibrate import engine_config

_METHOD_NAMES = {
    "none": "none",
    "first_block_cache": "FirstBlockCache",
    "taylorseer": "TaylorSeer lite",
    "pyramid_attention_broadcast": "PAB",
    "faster_cache": "FasterCache",
    "mag_cache": "MagCache",
    "teacache": "TeaCache",
    "dbcache": "DBCache F1B0 + TaylorSeer",
    "sea_cache": "SeaCache",
    "guarded_taylorseer": "Guarded TaylorSeer",
}
_KNOB_NAMES = {
    "threshold": "threshold",
    "rel_l1_thresh": "threshold",
    "residual_diff_threshold": "threshold",
    "cache_interval": "interval",
    "disable_cache_before_step": "from step",
    "spatial_attention_block_skip_range": "spatial range",
    "max_skip_steps": "max skip",
    "retention_ratio": "retention",
    "max_warmup_steps": "warmup",
    "step_tolerance": "tolerance",
    "max_interval": "max interval",
}


@dataclass(frozen=True)
class Point:
    policy: Mapping[str, Any]

    @property
    def method(self) -> str:
        return _METHOD_NAMES[self.policy["method"]]

    @property
    def knob(self) -> str:
        knobs = [f"{_KNOB_NAMES[k]} {v:g}" for k, v in self.policy.items() if k in _KNOB_NAMES]
        return ", ".join(knobs) or "-"

    def make(self, method_values: Mapping[str, Mapping[str, Any]], steps: int) -> CacheConfig | None:
        return engine_config(self.policy, method_values, steps)


def db_text(value: float | None) -> str:
    if value is None:
        return "-"
    return "identical" if math.isinf(value) else f"{value:.1f}"


def setting_name(steps: int, cfg: float) -> str:
    return f"{steps} steps, " + ("no CFG" if cfg <= 1 else f"true CFG {cfg:g}")


def json_safe(value: Any) -> Any:
    """Strict JSON has no infinity: identical images (infinite PSNR) are written as null."""
    if isinstance(value, float):
        return psnr_to_json(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
