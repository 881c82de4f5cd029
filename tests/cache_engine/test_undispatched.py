"""A block's undispatched forward (what a compiled server offers: the block compiled whole).

The engine runs it for a call whose policy acts on nothing inside the block, and counts what the
dispatchers it bypasses would have counted; a policy acting inside the block (on its attention) runs
the block through its dispatchers. Either way the output and the stats are those of an engine with no
such offer. Here the offered forward is a deep copy of the block: the same weights, and no dispatcher
ever installed inside it, so a call that went through it is seen.

With slots (taps) on the copy's attention modules, a policy whose attention handlers decide before the
block runs (PAB, TaylorSeer) runs the offer too: it decides ahead, the copy replays or runs each
attention module, and the handlers are told what was used.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import cache_engine as ce
from cache_engine.hooks import Tap, install_tap, offer_undispatched_forward
from cache_engine.targets import build_layout
from tests.cache_engine.pipelines import run
from tests.cache_engine.support import alone_and_in_lockstep, our_config, our_run, session_run, tiny

CASES = [("flux", "separate"), ("wan", "distilled")]
# Whether the method's handlers sit inside blocks (on attention) rather than on whole blocks.
ACTS_INSIDE_BLOCKS = {
    "none": False,
    "first_block_cache": False,
    "taylorseer_lite": False,
    "pyramid_attention_broadcast": True,
    "faster_cache": True,
    "taylorseer": True,
}
# Those among them whose attention handlers decide before the block runs.
FORESEEING = {"pyramid_attention_broadcast", "taylorseer"}


def _offer_copies(transformer: torch.nn.Module, taps: list[Tap] | None = None) -> list[str]:
    """Offer each block a copy of itself; the list fills with a block's name each time one runs.

    With ``taps`` given, the copy's attention modules get a slot each, offered with it and added there.
    """
    ran: list[str] = []
    layout = build_layout(transformer)
    attention = {site.module for site in layout.attention}
    for site in layout.blocks:
        twin = copy.deepcopy(site.module)
        slots: dict[torch.nn.Module, Tap] = {}
        for name, module in site.module.named_modules():
            if taps is not None and module in attention:
                slots[module] = tap = Tap()
                install_tap(twin.get_submodule(name), tap)
                taps.append(tap)

        def forward(*args: Any, _name: str = site.name, _twin: Any = twin, **kwargs: Any) -> Any:
            ran.append(_name)
            return _twin(*args, **kwargs)

        offer_undispatched_forward(site.module, forward, slots)
    return ran


def _offered_run(
    family: str, cfg: str, method: str, taps: list[Tap] | None = None
) -> tuple[list[str], ce.SessionStats]:
    """``method`` on a pipeline whose blocks offer copies of themselves (``_offer_copies``), checked
    equal in output and stats to the same pipeline on a plain engine; the blocks that ran the offer,
    and the stats."""
    offered, plain = tiny(family, cfg), tiny(family, cfg)
    config = None if method == "none" else our_config(method, offered)
    ran = _offer_copies(offered.pipe.transformer, taps)
    engine = ce.CacheEngine(offered.pipe.transformer)
    try:
        output, stats = session_run(engine, offered, config)
    finally:
        engine.close()
    expected, expected_stats = our_run(plain, config)
    assert torch.equal(output, expected)
    assert stats == expected_stats
    return ran, stats


@pytest.mark.parametrize(("family", "cfg"), CASES)
@pytest.mark.parametrize("method", list(ACTS_INSIDE_BLOCKS))
def test_the_offer_runs_where_the_policy_acts_on_nothing_inside_the_block(
    family: str, cfg: str, method: str
) -> None:
    ran, stats = _offered_run(family, cfg, method)
    if ACTS_INSIDE_BLOCKS[method]:
        assert ran == []
    else:
        assert len(ran) == stats.blocks_computed > 0
        if method != "none":
            assert stats.blocks_reused > 0  # the method skipped blocks, and still ran the offer for the rest


@pytest.mark.parametrize(("family", "cfg"), CASES)
@pytest.mark.parametrize("method", list(ACTS_INSIDE_BLOCKS))
def test_with_taps_the_offer_also_runs_where_the_handlers_inside_decide_ahead(
    family: str, cfg: str, method: str
) -> None:
    taps: list[Tap] = []
    ran, stats = _offered_run(family, cfg, method, taps)
    if ACTS_INSIDE_BLOCKS[method] and method not in FORESEEING:
        assert ran == []  # FasterCache reads each attention call's batch: it needs the dispatchers
    else:
        assert len(ran) == stats.blocks_computed > 0
    if method in FORESEEING:
        assert stats.attention_reused > 0  # replayed through the slots
    # Nothing is left in a slot between calls: no output kept alive, no replay seen by the next caller.
    assert taps and all(tap.replay is None and tap.output is None for tap in taps)


def test_two_requests_sharing_tapped_blocks_keep_their_own_replays() -> None:
    tp = tiny("wan", "distilled")
    _offer_copies(tp.pipe.transformer, [])
    pab, taylorseer = our_config("pyramid_attention_broadcast", tp), our_config("taylorseer", tp)
    alone, together = alone_and_in_lockstep(tp, pab, taylorseer, seed_b=1)
    for one, other in zip(alone, together, strict=True):
        assert torch.equal(one, other)


@pytest.mark.parametrize(("family", "cfg"), CASES[:1])
def test_without_a_session_the_offer_runs_and_whole_blocks_false_declines_it(family: str, cfg: str) -> None:
    offered, plain = tiny(family, cfg), tiny(family, cfg)
    ran = _offer_copies(offered.pipe.transformer)
    engine = ce.CacheEngine(offered.pipe.transformer)
    try:
        assert torch.equal(run(offered), run(plain))
        assert len(ran) > 0
        ran.clear()
        with engine.session(None, whole_blocks=False) as session:
            output = run(offered)
        assert ran == [] and torch.equal(output, run(plain))
        assert session.stats.attention_computed == session.stats.denoiser_calls * len(engine.layout.attention)
    finally:
        engine.close()
