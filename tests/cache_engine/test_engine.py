"""CacheEngine: exact when idle, dispatchers installed once, and a clean close."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

import cache_engine as ce
from cache_engine.hooks import installed_handle
from tests.cache_engine.pipelines import FAMILIES, FAMILY_INFO, run
from tests.cache_engine.support import RigFactory, session_run, tiny

IDLE_CASES = [
    ("flux", "distilled"),
    ("flux", "separate"),
    ("cogvideox", "batched"),
    ("wan", "separate"),
    ("wan", "distilled"),
]

# Configs that keep every hook in place but can never reuse: the output must be the unhooked one, bit for bit.
IDLE_CONFIGS: dict[str, object] = {
    "session-without-policy": None,
    "first-block-threshold-0": ce.FirstBlockCacheConfig(threshold=0.0),
    "taylorseer-interval-1": ce.TaylorSeerCacheConfig(cache_interval=1, disable_cache_before_step=0),
    "taylorseer-lite-interval-1": ce.TaylorSeerCacheConfig(
        cache_interval=1, disable_cache_before_step=0, use_lite_mode=True
    ),
    # Inside the window on every step, so only the skip range keeps it from reusing.
    "pab-range-1": ce.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=1,
        temporal_attention_block_skip_range=1,
        cross_attention_block_skip_range=1,
        spatial_attention_timestep_skip_range=(-1, 1001),
        temporal_attention_timestep_skip_range=(-1, 1001),
        cross_attention_timestep_skip_range=(-1, 1001),
    ),
}


def _dispatched(transformer: nn.Module) -> set[nn.Module]:
    return {m for m in transformer.modules() if installed_handle(m) is not None}


@pytest.mark.parametrize(("family", "cfg"), IDLE_CASES)
def test_installed_hooks_without_a_session_change_nothing(
    rig: RigFactory, uncached: Callable[..., torch.Tensor], family: str, cfg: str
) -> None:
    r = rig(family, cfg)
    assert _dispatched(r.tp.pipe.transformer)
    assert torch.equal(run(r.tp), uncached(family, cfg))


@pytest.mark.parametrize("name", list(IDLE_CONFIGS))
@pytest.mark.parametrize(("family", "cfg"), IDLE_CASES)
def test_exact_when_idle(
    rig: RigFactory, uncached: Callable[..., torch.Tensor], family: str, cfg: str, name: str
) -> None:
    r = rig(family, cfg)
    config = IDLE_CONFIGS[name]
    if name == "pab-range-1" and family != "wan":
        # Only Wan has cross attention; the other kinds cannot be asked of Flux or CogVideoX.
        config = ce.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=1, spatial_attention_timestep_skip_range=(-1, 1001)
        )
    output, stats = session_run(r.engine, r.tp, config)
    assert torch.equal(output, uncached(family, cfg))
    assert stats.blocks_reused == stats.attention_reused == stats.steps_cached == 0


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("flux", "cogvideox", "wan")])
def test_exact_when_idle_on_the_other_families(uncached: Callable[..., torch.Tensor], family: str) -> None:
    tp = tiny(family, FAMILY_INFO[family].default_cfg)
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        assert torch.equal(run(tp), uncached(family, tp.cfg))
        output, _ = session_run(engine, tp, ce.FirstBlockCacheConfig(threshold=0.0))
        assert torch.equal(output, uncached(family, tp.cfg))
    finally:
        engine.close()


def test_one_engine_per_transformer(rig: RigFactory) -> None:
    r = rig("flux", "distilled")
    transformer = r.tp.pipe.transformer
    assert ce.engine_of(transformer) is r.engine
    with pytest.raises(ValueError, match="already has a CacheEngine"):
        ce.CacheEngine(transformer)


def test_dispatchers_cover_denoiser_blocks_and_attention() -> None:
    transformer = tiny("wan", "separate").pipe.transformer
    engine = ce.CacheEngine(transformer)
    try:
        layout = engine.layout
        expected = {layout.denoiser} | layout.block_modules | layout.attention_modules
        assert _dispatched(transformer) == expected
    finally:
        engine.close()


def test_another_policy_installs_nothing_new(rig: RigFactory) -> None:
    r = rig("cogvideox", "batched")
    transformer = r.tp.pipe.transformer
    before = {m: installed_handle(m) for m in _dispatched(transformer)}
    for config in (
        ce.FirstBlockCacheConfig(threshold=0.5),
        ce.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2),
        ce.FasterCacheConfig(),
        ce.TaylorSeerCacheConfig(),
    ):
        session_run(r.engine, r.tp, config)
        assert {m: installed_handle(m) for m in _dispatched(transformer)} == before


def test_custom_identifiers_add_dispatchers_once(rig: RigFactory) -> None:
    r = rig("flux", "separate")
    transformer = r.tp.pipe.transformer
    config = ce.TaylorSeerCacheConfig(use_lite_mode=True)
    session_run(r.engine, r.tp, config)
    added = _dispatched(transformer)
    assert transformer.proj_out in added
    handles = {m: installed_handle(m) for m in added}
    session_run(r.engine, r.tp, config)
    assert {m: installed_handle(m) for m in _dispatched(transformer)} == handles


def test_supported_methods(rig: RigFactory) -> None:
    assert rig("flux", "distilled").engine.supported_methods == ce.METHOD_NAMES
    assert rig("flux", "distilled").engine.family == "flux"


def test_unknown_config_type_is_refused(rig: RigFactory) -> None:
    r = rig("flux", "distilled")
    with pytest.raises(ValueError, match="unknown cache config"), r.engine.session(object()):
        pass


def test_close_restores_the_transformer(uncached: Callable[..., torch.Tensor]) -> None:
    tp = tiny("flux", "separate")
    transformer = tp.pipe.transformer
    instance_attributes = set(transformer.__dict__)
    signatures = {name: inspect.signature(m.forward) for name, m in transformer.named_modules()}

    engine = ce.CacheEngine(transformer)
    session_run(engine, tp, ce.TaylorSeerCacheConfig(use_lite_mode=True))
    session_run(engine, tp, ce.FirstBlockCacheConfig())
    engine.close()
    engine.close()  # idempotent

    assert not _dispatched(transformer)
    assert all("forward" not in m.__dict__ for m in transformer.modules())
    assert "cache_context" not in transformer.__dict__
    assert "_reset_stateful_cache" not in transformer.__dict__
    assert ce.engine_of(transformer) is None
    # diffusers' own cache_context leaves a hook registry behind on first use; nothing else is new.
    assert set(transformer.__dict__) - instance_attributes <= {"_diffusers_hook"}
    assert {name: inspect.signature(m.forward) for name, m in transformer.named_modules()} == signatures
    assert torch.equal(run(tp), uncached("flux", "separate"))
    # A closed transformer takes a new engine.
    ce.CacheEngine(transformer).close()
