"""The reference entry points, for code written against diffusers' caching API.

``apply_*`` / ``enable_cache`` put one policy on the whole model, as the reference does: calls made
outside any session use it, and its state lasts one pipeline call (the pipeline's end-of-call reset
clears it). Sessions opened on the same model still take precedence within their own thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .engine import CacheEngine, engine_of
from .faster_cache import FasterCacheConfig
from .first_block_cache import FirstBlockCacheConfig
from .methods import method_name
from .pyramid_attention_broadcast import PyramidAttentionBroadcastConfig
from .session import branch
from .taylorseer_cache import TaylorSeerCacheConfig

_OWNED_ATTR = "_cache_engine_owned_by_reference_api"


def _engine(module: nn.Module) -> CacheEngine:
    engine = engine_of(module)
    if engine is None:
        engine = CacheEngine(module)
        module.__dict__[_OWNED_ATTR] = True
    return engine


def enable_cache(transformer: nn.Module, config: object) -> None:
    method_name(config)  # unknown config types fail before anything is installed
    engine = _engine(transformer)
    try:
        engine.enable(config)
    except ValueError:
        if transformer.__dict__.get(_OWNED_ATTR) and engine.ambient_config is None:
            _release(transformer, engine)
        raise


def disable_cache(transformer: nn.Module) -> None:
    engine = engine_of(transformer)
    if engine is None:
        return
    engine.disable()
    if transformer.__dict__.get(_OWNED_ATTR):
        _release(transformer, engine)


def _release(transformer: nn.Module, engine: CacheEngine) -> None:
    engine.close()
    transformer.__dict__.pop(_OWNED_ATTR, None)


@contextmanager
def cache_context(transformer: nn.Module, name: str) -> Iterator[None]:
    """Name the pass (``cond``, ``uncond``, ...) the calls inside make; state is kept per name."""
    with branch(name):
        yield


def apply_pyramid_attention_broadcast(module: nn.Module, config: PyramidAttentionBroadcastConfig) -> None:
    enable_cache(module, config)


def apply_faster_cache(module: nn.Module, config: FasterCacheConfig) -> None:
    enable_cache(module, config)


def apply_first_block_cache(module: nn.Module, config: FirstBlockCacheConfig) -> None:
    enable_cache(module, config)


def apply_taylorseer_cache(module: nn.Module, config: TaylorSeerCacheConfig) -> None:
    enable_cache(module, config)
