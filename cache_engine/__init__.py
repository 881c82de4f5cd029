"""Caching for diffusion transformers, with state that belongs to the request.

``CacheEngine(transformer)`` installs its dispatchers once; ``with engine.session(config):`` runs one
generation under that config. The reference API (``apply_*``, ``enable_cache``, ``disable_cache``,
``cache_context``) is provided for code written against diffusers' caching hooks.
"""

from .dbcache import DBCacheConfig
from .engine import CacheEngine, engine_of
from .errors import InvalidConfigValue, UnsupportedMethodError
from .faster_cache import FasterCacheConfig
from .first_block_cache import FirstBlockCacheConfig
from .guarded_taylorseer import GuardedTaylorSeerCacheConfig
from .mag_cache import MagCacheConfig
from .methods import CONFIG_CLASSES, METHOD_NAMES, CacheConfig, method_name
from .pyramid_attention_broadcast import PyramidAttentionBroadcastConfig
from .reference_api import (
    apply_faster_cache,
    apply_first_block_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
    cache_context,
    disable_cache,
    enable_cache,
)
from .sea_cache import SeaCacheConfig
from .session import CacheSession, SessionStats
from .taylorseer_cache import TaylorSeerCacheConfig
from .teacache import TeaCacheConfig

__all__ = [
    "CONFIG_CLASSES",
    "METHOD_NAMES",
    "CacheConfig",
    "CacheEngine",
    "CacheSession",
    "DBCacheConfig",
    "FasterCacheConfig",
    "FirstBlockCacheConfig",
    "GuardedTaylorSeerCacheConfig",
    "InvalidConfigValue",
    "MagCacheConfig",
    "PyramidAttentionBroadcastConfig",
    "SeaCacheConfig",
    "SessionStats",
    "TaylorSeerCacheConfig",
    "TeaCacheConfig",
    "UnsupportedMethodError",
    "apply_faster_cache",
    "apply_first_block_cache",
    "apply_pyramid_attention_broadcast",
    "apply_taylorseer_cache",
    "cache_context",
    "disable_cache",
    "enable_cache",
    "engine_of",
    "method_name",
]
