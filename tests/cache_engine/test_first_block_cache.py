"""FirstBlockCache: its config, where it cannot apply, and its skip decision counted on real runs."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import cache_engine as ce
from tests.cache_engine.support import (
    RigFactory,
    assert_default_matches_reference,
    assert_invalid,
    assert_unsupported,
    field_names,
    session_run,
    single_block_flux,
)


def test_fields_in_the_reference_order() -> None:
    import diffusers

    assert field_names(ce.FirstBlockCacheConfig) == field_names(diffusers.FirstBlockCacheConfig)


@pytest.mark.parametrize("field", field_names(ce.FirstBlockCacheConfig))
def test_default_matches_reference(field: str) -> None:
    assert_default_matches_reference("FirstBlockCacheConfig", field)


@pytest.mark.parametrize("value", [-0.1, "0.1", None, True, float("nan")])
def test_invalid_threshold(value: object) -> None:
    assert_invalid(ce.FirstBlockCacheConfig, "threshold", value)


def test_config_is_frozen() -> None:
    config = ce.FirstBlockCacheConfig(threshold=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 0.3  # type: ignore[misc]


def test_a_single_block_model_is_unsupported() -> None:
    assert_unsupported(single_block_flux(), ce.FirstBlockCacheConfig(), "first_block_cache")


@pytest.mark.parametrize(
    ("family", "cfg"), [("flux", "distilled"), ("flux", "separate"), ("cogvideox", "batched")]
)
def test_after_the_first_call_every_call_runs_only_the_head_block(
    rig: RigFactory, family: str, cfg: str
) -> None:
    """A threshold nothing can exceed: each branch computes all blocks once, then only the first.

    With separate cond/uncond calls the uncond branch must compute all blocks on its own first call;
    state shared with cond would let it skip there.
    """
    r = rig(family, cfg)
    output, stats = session_run(r.engine, r.tp, ce.FirstBlockCacheConfig(threshold=1e9))
    blocks = len(r.engine.layout.blocks)
    branches = 2 if cfg == "separate" else 1
    assert stats.blocks_computed == branches * blocks + (stats.denoiser_calls - branches)
    assert stats.steps_cached == stats.denoiser_calls - branches
    assert torch.isfinite(output).all()


def test_threshold_zero_computes_everything(rig: RigFactory) -> None:
    r = rig("wan", "separate")
    _, stats = session_run(r.engine, r.tp, ce.FirstBlockCacheConfig(threshold=0.0))
    assert stats.blocks_reused == 0
    assert stats.steps_cached == 0


def test_a_skipped_call_on_a_joint_stream_tail_reproduces_the_computed_one() -> None:
    """Flux2's last blocks see text and image as one stream: a call skipped on the same inputs as the
    computed one must give the same output, text and image residuals split where the stream joined."""
    from tiny_pipelines import tiny_pipeline

    # DiffusionPipeline declares no __call__; each pipeline class defines its own.
    pipeline: Any = tiny_pipeline("flux2").build()
    captured: dict[str, object] = {}

    def capture(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        captured.setdefault("kwargs", dict(kwargs))

    handle = pipeline.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    pipeline(
        prompt="a red circle",
        num_inference_steps=1,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **tiny_pipeline("flux2").small_call,
    )
    handle.remove()
    kwargs = captured["kwargs"]
    assert isinstance(kwargs, dict)
    engine = ce.CacheEngine(pipeline.transformer)
    try:
        with torch.no_grad(), engine.session(ce.FirstBlockCacheConfig(threshold=0.5)) as session:
            computed = pipeline.transformer(**kwargs)[0]
            reused = pipeline.transformer(**kwargs)[0]
        assert session.stats.blocks_reused > 0
        torch.testing.assert_close(reused, computed, rtol=0, atol=1e-5)
    finally:
        engine.close()
