"""The method registry: which config class is which method, and how to plan it on a model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from . import (
    dbcache,
    faster_cache,
    first_block_cache,
    guarded_taylorseer,
    mag_cache,
    pyramid_attention_broadcast,
    sea_cache,
    taylorseer_cache,
    teacache,
)
from .dbcache import DBCacheConfig
from .faster_cache import FasterCacheConfig
from .first_block_cache import FirstBlockCacheConfig
from .guarded_taylorseer import GuardedTaylorSeerCacheConfig
from .mag_cache import MagCacheConfig
from .pyramid_attention_broadcast import PyramidAttentionBroadcastConfig
from .sea_cache import SeaCacheConfig
from .session import Plan
from .targets import ModelLayout
from .taylorseer_cache import TaylorSeerCacheConfig
from .teacache import TeaCacheConfig

CacheConfig = Union[  # noqa: UP007 (a runtime alias used in isinstance-free annotations)
    PyramidAttentionBroadcastConfig,
    FasterCacheConfig,
    FirstBlockCacheConfig,
    TaylorSeerCacheConfig,
    MagCacheConfig,
    SeaCacheConfig,
    DBCacheConfig,
    TeaCacheConfig,
    GuardedTaylorSeerCacheConfig,
]

_PLANNERS: dict[type, tuple[str, Callable[[Any, ModelLayout], Plan]]] = {
    PyramidAttentionBroadcastConfig: (pyramid_attention_broadcast.NAME, pyramid_attention_broadcast.plan),
    FasterCacheConfig: (faster_cache.NAME, faster_cache.plan),
    FirstBlockCacheConfig: (first_block_cache.NAME, first_block_cache.plan),
    TaylorSeerCacheConfig: (taylorseer_cache.NAME, taylorseer_cache.plan),
    MagCacheConfig: (mag_cache.NAME, mag_cache.plan),
    SeaCacheConfig: (sea_cache.NAME, sea_cache.plan),
    DBCacheConfig: (dbcache.NAME, dbcache.plan),
    TeaCacheConfig: (teacache.NAME, teacache.plan),
    GuardedTaylorSeerCacheConfig: (guarded_taylorseer.NAME, guarded_taylorseer.plan),
}

# Configs whose defaults cannot run anywhere are probed with these instead: MagCache's default has no
# mag_ratios, which are per checkpoint, so a model supports it if a calibration run plans there.
# DBCache's default runs 8 front blocks, more than small models have; TeaCache's coefficients are per
# model, and a family without published ones needs them given.
_PROBE_CONFIGS: dict[type, Callable[[], object]] = {
    MagCacheConfig: lambda: MagCacheConfig(calibrate=True),
    DBCacheConfig: lambda: DBCacheConfig(Fn_compute_blocks=1),
    TeaCacheConfig: lambda: TeaCacheConfig(coefficients=(1.0, 0.0)),
    # Supported where any attention can be broadcast; the request's config says which kinds.
    PyramidAttentionBroadcastConfig: lambda: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        temporal_attention_block_skip_range=2,
        cross_attention_block_skip_range=2,
    ),
}

# Methods whose reference defaults cannot act on every model say what they run with there instead.
_FITTERS: dict[type, Callable[[ModelLayout], dict[str, Any]]] = {
    DBCacheConfig: dbcache.fitted_defaults,
}

METHOD_NAMES: tuple[str, ...] = tuple(name for name, _ in _PLANNERS.values())
# Method name -> config class: how a caller turns a method name (e.g. from a request) into a config.
CONFIG_CLASSES: dict[str, type] = {name: cls for cls, (name, _) in _PLANNERS.items()}


def method_name(config: object) -> str:
    entry = _PLANNERS.get(type(config))
    if entry is None:
        raise ValueError(
            f"unknown cache config {type(config).__name__}; expected one of {list(METHOD_NAMES)}"
        )
    return entry[0]


def plan_for(config: object, layout: ModelLayout) -> Plan:
    entry = _PLANNERS.get(type(config))
    if entry is None:
        raise ValueError(
            f"unknown cache config {type(config).__name__}; expected one of {list(METHOD_NAMES)}"
        )
    return entry[1](config, layout)


def supported_methods(layout: ModelLayout) -> tuple[str, ...]:
    """The methods whose default config plans something on this model."""
    supported = []
    for config_class, (name, planner) in _PLANNERS.items():
        try:
            planner(_PROBE_CONFIGS.get(config_class, config_class)(), layout)
        except ValueError:
            continue
        supported.append(name)
    return tuple(supported)


def fitted_defaults(method: str, layout: ModelLayout) -> dict[str, Any]:
    """The fields of ``method`` whose reference default cannot act on this model, with the values it runs
    with here instead (empty: the reference defaults apply as they are)."""
    if method not in CONFIG_CLASSES:
        raise ValueError(f"unknown cache method {method!r}; expected one of {list(METHOD_NAMES)}")
    fitter = _FITTERS.get(CONFIG_CLASSES[method])
    return {} if fitter is None else fitter(layout)
