"""The package's public surface, pinned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cache_engine as ce

EXPECTED_ALL = [
    "CONFIG_CLASSES",
    "METHOD_NAMES",
    "CacheConfig",
    "CacheEngine",
    "CacheSession",
    "FasterCacheConfig",
    "FirstBlockCacheConfig",
    "InvalidConfigValue",
    "PyramidAttentionBroadcastConfig",
    "SessionStats",
    "TaylorSeerCacheConfig",
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


def test_all_is_pinned() -> None:
    assert ce.__all__ == EXPECTED_ALL
    assert all(hasattr(ce, name) for name in ce.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from cache_engine import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(EXPECTED_ALL)


def test_method_names_and_configs() -> None:
    assert ce.METHOD_NAMES == (
        "pyramid_attention_broadcast",
        "faster_cache",
        "first_block_cache",
        "taylorseer",
    )
    assert [
        ce.method_name(cls())
        for cls in (
            ce.PyramidAttentionBroadcastConfig,
            ce.FasterCacheConfig,
            ce.FirstBlockCacheConfig,
            ce.TaylorSeerCacheConfig,
        )
    ] == list(ce.METHOD_NAMES)
    assert issubclass(ce.UnsupportedMethodError, ValueError)


def test_import_has_no_side_effects() -> None:
    """Importing the engine loads neither diffusers nor anything that installs hooks."""
    code = "import sys, cache_engine; print('diffusers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert result.stdout.strip() == "False"
