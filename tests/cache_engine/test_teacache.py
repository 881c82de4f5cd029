"""TeaCache: its config and coefficients, its signal on every family, and its decisions on real runs.

No installable reference runs TeaCache on these pipelines, so the paper's rule is written out here, in
numpy, and checked against the decisions the engine made, on the modulated inputs it saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import cache_engine as ce
from cache_engine.targets import FAMILIES as FAMILY_TABLE
from cache_engine.targets import BlockSite, build_layout, modulated_input
from cache_engine.teacache import rescale, runs
from tests.cache_engine.pipelines import FAMILIES, run
from tests.cache_engine.support import (
    RigFactory,
    alone_and_in_lockstep,
    assert_invalid,
    flux2_call,
    max_diff,
    record_block_runs,
    rigs,
    session_run,
    tiny,
    tiny_flux2,
)

Config = ce.TeaCacheConfig
STEPS = 8
# A polynomial that leaves the change as it is: the accumulator then sums plain relative L1 changes.
IDENTITY = (1.0, 0.0)


@pytest.fixture(scope="module")
def rig() -> Iterator[RigFactory]:
    """The package's ``rig``, at this module's step count."""
    with rigs(steps=STEPS) as get:
        yield get


# -- config and coefficients -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("rel_l1_thresh", v) for v in (-0.1, "0.2", None, float("nan"), True)],
        *[("coefficients", v) for v in ([], "1,2", [1.0, "2"], [float("inf")], [True], 3.0)],
        *[("num_steps", v) for v in (0, -1, 2.5, "10")],
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    assert_invalid(Config, field, value)


def test_config_is_frozen_and_coefficients_a_tuple_of_floats() -> None:
    config = Config(coefficients=[2, 0.5])  # type: ignore[arg-type]
    assert config.coefficients == (2.0, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rel_l1_thresh = 0.1  # type: ignore[misc]


def test_rescale_is_numpy_poly1d_bit_for_bit() -> None:
    coefficients = FAMILY_TABLE[0].teacache_coefficients
    assert coefficients is not None
    for x in (0.0, 0.013, 0.07, 0.31, 1.7):
        assert rescale(coefficients, x) == float(np.poly1d(coefficients)(x))


def test_the_paper_gives_coefficients_for_flux_hunyuan_video_ltx_and_mochi() -> None:
    published = {spec.name for spec in FAMILY_TABLE if spec.teacache_coefficients is not None}
    assert published == {"flux", "hunyuan_video", "ltx", "mochi"}
    assert all(len(spec.teacache_coefficients or ()) == 5 for spec in FAMILY_TABLE if spec.name in published)


def test_a_family_without_coefficients_needs_them(rig: RigFactory) -> None:
    engine = rig("wan", "distilled").engine
    with pytest.raises(ce.InvalidConfigValue) as raised:
        engine.check(Config())
    assert raised.value.field == "coefficients" and "WanTransformer3DModel" in str(raised.value)
    engine.check(Config(coefficients=IDENTITY))
    # It is still offered: a request that brings its coefficients runs.
    assert "teacache" in engine.supported_methods
    rig("flux", "distilled").engine.check(Config())


# -- the signal ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_signal_is_what_the_first_block_feeds_its_attention(family: str) -> None:
    """The modulated input, recomputed from the first block's arguments, is bit for bit the tensor
    that block passes to its first attention module as hidden_states."""
    tp = tiny(family, steps=2)
    transformer = tp.pipe.transformer
    layout = build_layout(transformer)
    site: BlockSite = runs(layout)[0][0]
    attention = next(a.module for a in layout.attention if a.name.startswith(f"{site.name}."))
    ours: list[torch.Tensor] = []
    theirs: list[torch.Tensor] = []

    def at_block(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with torch.no_grad():
            ours.append(modulated_input(site, args, kwargs))

    def at_attention(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        theirs.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handles = [
        site.module.register_forward_pre_hook(at_block, with_kwargs=True),
        attention.register_forward_pre_hook(at_attention, with_kwargs=True),
    ]
    try:
        run(tp)
    finally:
        for handle in handles:
            handle.remove()
    assert len(ours) == len(theirs) > 0
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_the_signal_of_hunyuan_video_i2vs_token_replace_block_is_what_it_feeds_its_attention() -> None:
    """HunyuanVideo-I2V's blocks modulate the image's tokens (the first latent frame) at timestep 0 and the
    rest at the step's: the recomputed input is still bit for bit what the first attention receives."""
    from tiny_pipelines import tiny_pipeline

    transformer = tiny_pipeline("hunyuan_video_i2v").build().transformer
    layout = build_layout(transformer)
    site: BlockSite = runs(layout)[0][0]
    assert type(site.module).__name__ == "HunyuanVideoTokenReplaceTransformerBlock"
    attention = next(a.module for a in layout.attention if a.name.startswith(f"{site.name}."))
    ours: list[torch.Tensor] = []
    theirs: list[torch.Tensor] = []

    def at_block(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ours.append(modulated_input(site, args, kwargs))

    def at_attention(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        theirs.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    handles = [
        site.module.register_forward_pre_hook(at_block, with_kwargs=True),
        attention.register_forward_pre_hook(at_attention, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            transformer(
                hidden_states=torch.randn(1, config.in_channels, 2, 8, 8, generator=generator),
                timestep=torch.tensor([900.0]),
                encoder_hidden_states=torch.randn(1, 6, config.text_embed_dim, generator=generator),
                encoder_attention_mask=torch.ones(1, 6),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
                guidance=torch.tensor([3000.0]),
            )
    finally:
        for handle in handles:
            handle.remove()
    assert len(ours) == len(theirs) == 1
    assert torch.equal(ours[0], theirs[0])


# -- decisions ----------------------------------------------------------------------------------------


def test_rel_l1_thresh_zero_is_exact(rig: RigFactory) -> None:
    r = rig("flux", "separate")
    output, stats = session_run(r.engine, r.tp, Config(rel_l1_thresh=0.0))
    assert stats.blocks_reused == 0 and stats.steps_cached == 0
    assert torch.equal(output, run(tiny("flux", "separate", steps=STEPS)))


def _paper_decisions(
    modulated: list[torch.Tensor], config: Config, coefficients: tuple[float, ...]
) -> list[bool]:
    """TeaCache's rule as its scripts write it (numpy's poly1d on the .item() of the relative L1)."""
    rescale_func = np.poly1d(coefficients)
    decisions = []
    accumulated = 0.0
    previous: torch.Tensor | None = None
    for count, current in enumerate(modulated):
        if count == 0 or count == (config.num_steps or 0) - 1:
            should_calc = True
            accumulated = 0.0
        else:
            assert previous is not None
            accumulated += rescale_func(
                ((current - previous).abs().mean() / previous.abs().mean()).cpu().item()
            )
            if accumulated < config.rel_l1_thresh:
                should_calc = False
            else:
                should_calc = True
                accumulated = 0.0
        previous = current
        decisions.append(should_calc)
    return decisions


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("flux", Config(rel_l1_thresh=0.6, num_steps=STEPS)),
        ("flux", Config(rel_l1_thresh=0.25)),
        ("hunyuan_video", Config(rel_l1_thresh=0.15, num_steps=STEPS)),
        ("ltx", Config(rel_l1_thresh=0.1, num_steps=STEPS)),
        ("cogvideox", Config(rel_l1_thresh=0.5, coefficients=IDENTITY, num_steps=STEPS)),
    ],
)
def test_decisions_follow_the_papers_rule(family: str, config: Config) -> None:
    """Record the first block's modulated input at every call (a pre-hook sees skipped calls too) and
    which calls really ran it, then replay the paper's rule on those inputs."""
    tp = tiny(family, steps=STEPS)
    transformer = tp.pipe.transformer
    first = build_layout(transformer).blocks[0].module
    ran = record_block_runs(first, first)
    engine = ce.CacheEngine(transformer)
    site = engine.layout.blocks[0]
    modulated: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with torch.no_grad():
            modulated.append(modulated_input(site, args, kwargs))

    handle = first.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _, stats = session_run(engine, tp, config)
    finally:
        handle.remove()
        engine.close()
    coefficients = config.coefficients or engine.layout.family.teacache_coefficients
    assert coefficients is not None
    assert ran == _paper_decisions(modulated, config, coefficients)
    assert stats.steps_cached == ran.count(False) > 0
    if config.num_steps is not None:
        assert ran[0] and ran[-1]


@pytest.mark.parametrize(
    ("family", "cfg"), [("flux", "separate"), ("wan", "separate"), ("cogview4", "separate")]
)
def test_cfg_branches_keep_their_own_state(rig: RigFactory, family: str, cfg: str) -> None:
    """Each branch computes its own first call; with a threshold never reached, only those two."""
    r = rig(family, cfg)
    _, stats = session_run(r.engine, r.tp, Config(rel_l1_thresh=1e9, coefficients=IDENTITY))
    blocks = len(r.engine.layout.blocks)
    assert stats.denoiser_calls == 2 * STEPS
    assert stats.blocks_computed == 2 * blocks
    assert stats.steps_cached == 2 * STEPS - 2


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reuses_and_stays_close(rig: RigFactory, family: str) -> None:
    r = rig(family, None)
    plain = run(tiny(family, steps=STEPS))
    output, stats = session_run(
        r.engine, r.tp, Config(rel_l1_thresh=0.3, coefficients=IDENTITY, num_steps=STEPS)
    )
    assert 0 < stats.steps_cached < stats.denoiser_calls
    assert torch.isfinite(output).all()
    assert max_diff(output, plain) > 0


def test_num_steps_forces_the_last_call(rig: RigFactory) -> None:
    r = rig("cogvideox", None)
    never = Config(rel_l1_thresh=1e9, coefficients=IDENTITY)
    _, without = session_run(r.engine, r.tp, never)
    _, with_last = session_run(r.engine, r.tp, dataclasses.replace(never, num_steps=STEPS))
    blocks = len(r.engine.layout.blocks)
    assert without.blocks_computed == blocks
    assert with_last.blocks_computed == 2 * blocks


# -- isolation -----------------------------------------------------------------------------------------


def test_interleaved_sessions_give_their_sequential_outputs() -> None:
    """Two sessions on one transformer, in two threads, each step of one overlapping the other's."""
    config_a = Config(rel_l1_thresh=0.6, num_steps=STEPS)
    config_b = Config(rel_l1_thresh=0.4, coefficients=IDENTITY)
    (alone_a, alone_b), (together_a, together_b) = alone_and_in_lockstep(
        tiny("flux", "separate", steps=STEPS), config_a, config_b, seed_b=1
    )
    assert torch.equal(together_a, alone_a) and torch.equal(together_b, alone_b)
    assert not torch.equal(alone_a, alone_b)


# -- block lists that change layout --------------------------------------------------------------------


def test_lists_that_join_streams_carry_a_residual_each() -> None:
    """On a repeated call every block is skipped, and the per-list residuals rebuild the first call's
    output; another input shape in the same session computes instead of failing."""
    transformer = tiny_flux2()
    plain = flux2_call(transformer, 16)
    engine = ce.CacheEngine(transformer)
    try:
        assert len(runs(engine.layout)) == 2
        with engine.session(Config(rel_l1_thresh=1e9, coefficients=IDENTITY)) as session:
            first, again = flux2_call(transformer, 16), flux2_call(transformer, 16)
            wider = flux2_call(transformer, 36)
    finally:
        engine.close()
    blocks = len(engine.layout.blocks)
    assert session.stats.blocks_computed == 2 * blocks and session.stats.blocks_reused == blocks
    assert torch.equal(first, plain)
    torch.testing.assert_close(again, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(wider, flux2_call(transformer, 36), rtol=0, atol=0)
