"""DBCache: its config, parity with cache-dit 1.5.3, each departure, and which steps reuse on real runs.

Parity runs our engine and cache-dit (``cache_dit.enable_cache`` on an identically seeded pipeline) at
configs where both really reuse: the front/back split, the limits, the step mask and the TaylorSeer
calibrator are all exercised, over eight steps so that the calibrator's derivatives come into play.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

import cache_engine as ce
from cache_engine.dbcache import chains
from cache_engine.targets import ModelLayout
from tests.cache_engine.pipelines import TinyPipeline, run
from tests.cache_engine.support import (
    RigFactory,
    alone_and_in_lockstep,
    assert_invalid,
    assert_refused_on_the_model,
    assert_unsupported,
    flux2_call,
    max_diff,
    record_block_runs,
    rigs,
    session_run,
    single_block_flux,
    small_flux,
    tiny,
    tiny_flux2,
)

Config = ce.DBCacheConfig
STEPS = 8
TOLERANCE = 1e-5

# The parity configs: reuse with a back block and a streak limit; TaylorSeer of order 2 with computes
# spaced so its derivatives are used; two front blocks under a static mask and a cap on cached steps.
PARITY_CONFIGS: dict[str, dict[str, Any]] = {
    "F1B1-limits": {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 1,
        "residual_diff_threshold": 0.6,
        "max_warmup_steps": 1,
        "max_continuous_cached_steps": 2,
    },
    "F1B1-taylorseer2": {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 1,
        "residual_diff_threshold": 0.9,
        "max_warmup_steps": 3,
        "max_continuous_cached_steps": 1,
        "enable_taylorseer": True,
        "taylorseer_order": 2,
    },
    "F2B0-static-mask": {
        "Fn_compute_blocks": 2,
        "Bn_compute_blocks": 0,
        "residual_diff_threshold": 2.0,
        "max_warmup_steps": 8,
        "max_cached_steps": 3,
        "steps_computation_mask": (1, 1, 0, 0, 1, 0, 0, 1),
        "steps_computation_policy": "static",
    },
}
PARITY_CASES: tuple[tuple[str, str], ...] = (
    ("flux", "distilled"),
    ("flux", "separate"),
    ("cogvideox", "batched"),
    ("wan", "distilled"),
    ("wan", "separate"),
    ("hunyuan_video", "distilled"),
    ("ltx", "batched"),
    ("sd3", "batched"),
    ("cogview4", "separate"),
    ("pixart", "batched"),
)


def _cache_dit() -> ModuleType:
    return pytest.importorskip("cache_dit", reason="cache-dit (the dev extra) is needed for parity")


def _theirs(tp: TinyPipeline, config: dict[str, Any], *, guess_cfg: bool = False) -> torch.Tensor:
    """``tp`` run under cache-dit with the same parameters, its hooks taken off again whatever happens.

    cache-dit is told whether the pipeline makes separate CFG calls, unless ``guess_cfg``: then it
    guesses from the pipeline class, as it does by default (departure 1).
    """
    cache_dit = _cache_dit()
    kwargs = dict(config)
    taylorseer, order = kwargs.pop("enable_taylorseer", False), kwargs.pop("taylorseer_order", 1)
    if "steps_computation_mask" in kwargs:
        kwargs["steps_computation_mask"] = list(kwargs["steps_computation_mask"])
    separate = None if guess_cfg else tp.cfg == "separate"
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if taylorseer else None
    cache_dit.enable_cache(
        tp.pipe,
        cache_config=cache_dit.DBCacheConfig(enable_separate_cfg=separate, **kwargs),
        calibrator_config=calibrator,
    )
    try:
        return run(tp)
    finally:
        cache_dit.disable_cache(tp.pipe)


def _counts(stats: ce.SessionStats) -> dict[str, Any]:
    """The executions counted, without the method's name or how much memory its state held."""
    return {name: value for name, value in stats.as_dict().items() if name not in ("method", "peak_bytes")}


def _fitted(config: dict[str, Any], layout: ModelLayout) -> dict[str, Any]:
    """``config`` with fewer front or back blocks where the model's chains are too short to keep a
    middle block (HunyuanVideo caches lists of two blocks apart)."""
    shortest = min(len(chain) for chain in chains(layout))
    front = min(config["Fn_compute_blocks"], shortest - 1)
    back = min(config["Bn_compute_blocks"], shortest - 1 - front)
    return {**config, "Fn_compute_blocks": front, "Bn_compute_blocks": back}


@pytest.fixture(scope="module")
def pairs() -> Iterator[RigFactory]:
    """Our pipeline with its engine, and an identically built one left to cache-dit."""
    with rigs(steps=STEPS) as get:
        yield get


@pytest.fixture(scope="module")
def plain() -> Callable[[str, str], torch.Tensor]:
    """The output of a pipeline no cache code touched, once per (family, cfg)."""
    found: dict[tuple[str, str], torch.Tensor] = {}

    def get(family: str, cfg: str) -> torch.Tensor:
        if (family, cfg) not in found:
            found[(family, cfg)] = run(tiny(family, cfg, steps=STEPS))
        return found[(family, cfg)]

    return get


# -- config ------------------------------------------------------------------------------------------


def test_fields_and_defaults_are_cache_dits() -> None:
    cache_dit = _cache_dit()
    theirs = {field.name: field.default for field in dataclasses.fields(cache_dit.DBCacheConfig)}
    calibrator = {f.name: f.default for f in dataclasses.fields(cache_dit.TaylorSeerCalibratorConfig)}
    for field in dataclasses.fields(Config):
        if field.name == "enable_taylorseer":
            assert field.default is False  # cache-dit: no calibrator_config
        elif field.name == "taylorseer_order":
            assert field.default == calibrator["taylorseer_order"]
        else:
            assert field.default == theirs[field.name], field.name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("Fn_compute_blocks", v) for v in (0, -1, 1.5, "8", True, None)],
        *[("Bn_compute_blocks", v) for v in (-1, 0.5, None)],
        *[("residual_diff_threshold", v) for v in (-0.1, "0.1", None, float("nan"), float("inf"))],
        *[("max_accumulated_residual_diff_threshold", v) for v in (-1.0, "1", float("nan"))],
        *[("max_warmup_steps", v) for v in (-1, 2.0, None)],
        *[("warmup_interval", v) for v in (0, -2, None)],
        *[("max_cached_steps", v) for v in (-2, 1.5, None, False)],
        *[("max_continuous_cached_steps", v) for v in (-2, "3", None)],
        *[("steps_computation_mask", v) for v in ([], [1, 2], "1100", [True, False], [0.5], [1.0], 5)],
        *[("steps_computation_policy", v) for v in ("fixed", None, 1)],
        *[("enable_taylorseer", v) for v in (1, "yes", None)],
        *[("taylorseer_order", v) for v in (0, 3, 1.0, True, None)],
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    assert_invalid(Config, field, value)


def test_config_is_frozen_and_the_mask_a_tuple() -> None:
    config = Config(steps_computation_mask=[1, 0, 1])  # type: ignore[arg-type]
    assert config.steps_computation_mask == (1, 0, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.Fn_compute_blocks = 2  # type: ignore[misc]


def test_warmup_is_cut_short_by_the_masks_leading_computes() -> None:
    assert list(Config(max_warmup_steps=4, warmup_interval=2).warmup_steps) == [0, 2]
    assert list(Config(max_warmup_steps=4, steps_computation_mask=(1, 1, 0, 1)).warmup_steps) == [0, 1]


def test_front_and_back_blocks_must_fit_the_chain(pairs: RigFactory) -> None:
    engine = pairs("cogvideox", "batched").engine  # four blocks
    engine.check(Config(Fn_compute_blocks=2, Bn_compute_blocks=2))
    # Like the default (8 front blocks), these do not fit this model, but the method is offered.
    for config, field in (
        (Config(Fn_compute_blocks=5), "Fn_compute_blocks"),
        (Config(Fn_compute_blocks=3, Bn_compute_blocks=2), "Bn_compute_blocks"),
    ):
        error = assert_refused_on_the_model(engine, config, field, method="dbcache")
        assert "4 blocks" in str(error)


def test_a_small_model_is_fitted_one_front_block_and_a_long_chain_keeps_the_reference_default(
    pairs: RigFactory,
) -> None:
    small = pairs("cogvideox", "batched").engine  # four blocks: the default's 8 cannot act
    fitted = small.fitted_defaults("dbcache")
    assert fitted == {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0}
    small.check(Config(**fitted))
    # Flux's two lists are one chain: nine blocks leave one to cache behind the default's eight front
    # blocks, so the reference default stands; eight leave none, so the model's own is used.
    for blocks, fitted_there in ((9, False), (8, True)):
        engine = ce.CacheEngine(small_flux(double_blocks=4, single_blocks=blocks - 4))
        try:
            assert bool(engine.fitted_defaults("dbcache")) is fitted_there, blocks
            engine.check(Config(**engine.fitted_defaults("dbcache")))
        finally:
            engine.close()
    # Methods whose defaults act anywhere they are offered fit nothing.
    assert small.fitted_defaults("first_block_cache") == {}
    with pytest.raises(ValueError, match="unknown cache method"):
        small.fitted_defaults("no_such_method")


def test_a_single_block_model_is_unsupported() -> None:
    assert_unsupported(single_block_flux(), Config(Fn_compute_blocks=1), "dbcache")


def test_chains_follow_cache_dits_block_adapters(pairs: RigFactory) -> None:
    # Flux's two lists are one chain (cache-dit's default "dummy blocks"); HunyuanVideo's are apart.
    flux = pairs("flux", "distilled").engine.layout
    assert chains(flux) == (flux.blocks,)
    hunyuan = pairs("hunyuan_video", "distilled").engine.layout
    lists = [{site.name.split(".")[0] for site in chain} for chain in chains(hunyuan)]
    assert lists == [{"transformer_blocks"}, {"single_transformer_blocks"}]


# -- parity with cache-dit ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
@pytest.mark.parametrize(("family", "cfg"), PARITY_CASES)
def test_same_output_as_cache_dit(
    pairs: RigFactory, plain: Callable[[str, str], torch.Tensor], family: str, cfg: str, name: str
) -> None:
    pair = pairs(family, cfg)
    config = _fitted(PARITY_CONFIGS[name], pair.engine.layout)
    ours, stats = session_run(pair.engine, pair.tp, Config(**config))
    theirs = _theirs(pair.reference, config)
    assert stats.blocks_reused > 0
    assert max_diff(theirs, plain(family, cfg)) > 1e-4
    assert max_diff(ours, theirs) <= TOLERANCE


@pytest.mark.parametrize(
    ("family", "cfg"), [("flux", "distilled"), ("cogvideox", "batched"), ("wan", "separate")]
)
def test_one_front_block_without_calibrator_is_first_block_cache(
    pairs: RigFactory, family: str, cfg: str
) -> None:
    """F1B0 at FirstBlockCache's threshold, with no warmup or limits, makes the same calls bit for bit."""
    pair = pairs(family, cfg)
    dbcache, dbcache_stats = session_run(
        pair.engine, pair.tp, Config(Fn_compute_blocks=1, residual_diff_threshold=0.5, max_warmup_steps=0)
    )
    fbc, fbc_stats = session_run(pair.engine, pair.tp, ce.FirstBlockCacheConfig(threshold=0.5))
    assert dbcache_stats.blocks_reused > 0
    assert torch.equal(dbcache, fbc)
    assert _counts(dbcache_stats) == _counts(fbc_stats)


# -- departures from cache-dit -----------------------------------------------------------------------


@pytest.mark.parametrize(("family", "cfg"), [("wan", "distilled"), ("flux", "separate")])
def test_departure_state_follows_the_cfg_branch_not_the_call_count(
    pairs: RigFactory, family: str, cfg: str
) -> None:
    """Departure 1. cache-dit guesses from the pipeline class whether CFG calls alternate: WanPipeline
    "has separate CFG" even when run without CFG, and FluxPipeline "has not" even with true CFG. It
    then keeps state per call parity, so a wrong guess pairs unrelated calls. Ours keys state by the
    pipeline's own cond/uncond context, and equals cache-dit told the truth.
    """
    config = PARITY_CONFIGS["F1B1-limits"]
    pair = pairs(family, cfg)
    ours, _ = session_run(pair.engine, pair.tp, Config(**config))
    guessed = _theirs(pair.reference, config, guess_cfg=True)
    assert max_diff(ours, guessed) > 1e-4
    assert max_diff(ours, _theirs(pair.reference, config)) <= TOLERANCE


def test_departure_calibrator_with_a_last_block_without_text_stream(pairs: RigFactory) -> None:
    """Departure 2. SD3's last block returns no text stream; with it in the middle (no back block),
    cache-dit's text-stream calibrator has nothing recorded and fails on the first cached step. Ours
    extrapolates the image stream and carries the text stream as it comes.
    """
    config = {**PARITY_CONFIGS["F1B1-taylorseer2"], "Bn_compute_blocks": 0}
    pair = pairs("sd3", "batched")
    with pytest.raises(AssertionError, match="not found"):
        _theirs(pair.reference, config)
    ours, stats = session_run(pair.engine, pair.tp, Config(**config))
    assert stats.blocks_reused > 0 and torch.isfinite(ours).all()


def test_departure_a_masked_step_with_nothing_cached_computes(pairs: RigFactory, probe: Probe) -> None:
    """Departure 3. A static mask that leaves step 0 to the cache: cache-dit fails (nothing cached
    yet); ours computes that step, then follows the mask.
    """
    config: dict[str, Any] = {
        "Fn_compute_blocks": 1,
        "max_warmup_steps": 0,
        "steps_computation_mask": (0, 1, 0, 0, 1, 0, 0, 0),
        "steps_computation_policy": "static",
    }
    pair = pairs("cogvideox", "batched")
    with pytest.raises(AssertionError):
        _theirs(pair.reference, config)
    assert probe.middle_runs(Config(**config)) == [True, True, False, False, True, False, False, False]


# -- which steps reuse -------------------------------------------------------------------------------


@dataclasses.dataclass
class Probe:
    """CogVideoX (one call per step, four blocks) with a record, per call, of whether block 1 ran."""

    tp: TinyPipeline
    engine: ce.CacheEngine
    ran: list[bool]

    def middle_runs(self, config: Config) -> list[bool]:
        self.ran.clear()
        session_run(self.engine, self.tp, config)
        return list(self.ran)


@pytest.fixture(scope="module")
def probe() -> Iterator[Probe]:
    tp = tiny("cogvideox", "batched", steps=STEPS)
    transformer = tp.pipe.transformer
    ran = record_block_runs(transformer, transformer.transformer_blocks[1])
    engine = ce.CacheEngine(transformer)
    yield Probe(tp, engine, ran)
    engine.close()


ALWAYS: dict[str, Any] = {
    "Fn_compute_blocks": 1,
    "residual_diff_threshold": 2.0,
}  # a threshold >= 1 always reuses


def test_a_threshold_of_zero_is_exact(probe: Probe, plain: Callable[[str, str], torch.Tensor]) -> None:
    config = Config(Fn_compute_blocks=1, residual_diff_threshold=0.0, max_warmup_steps=0)
    output, stats = session_run(probe.engine, probe.tp, config)
    assert stats.blocks_reused == 0 and stats.steps_cached == 0
    assert torch.equal(output, plain("cogvideox", "batched"))


def test_warmup_steps_compute(probe: Probe) -> None:
    assert probe.middle_runs(Config(**ALWAYS, max_warmup_steps=3)) == [True] * 3 + [False] * 5
    runs = probe.middle_runs(Config(**ALWAYS, max_warmup_steps=5, warmup_interval=2))
    # Steps 0, 2, 4 are warmup; 1 and 3 may reuse what step 0 and 2 left.
    assert runs == [True, False, True, False, True, False, False, False]


def test_max_cached_steps(probe: Probe) -> None:
    runs = probe.middle_runs(Config(**ALWAYS, max_warmup_steps=1, max_cached_steps=3))
    assert runs == [True, False, False, False, True, True, True, True]


def test_max_continuous_cached_steps(probe: Probe) -> None:
    runs = probe.middle_runs(Config(**ALWAYS, max_warmup_steps=1, max_continuous_cached_steps=2))
    assert runs == [True, False, False, True, False, False, True, False]


def test_dynamic_mask_forces_its_computes_and_leaves_the_rest_to_the_threshold(probe: Probe) -> None:
    mask = (1, 0, 1, 0, 0, 1, 0, 0)
    assert probe.middle_runs(Config(**ALWAYS, max_warmup_steps=0, steps_computation_mask=mask)) == [
        m == 1 for m in mask
    ]
    # Under a threshold nothing meets, the steps the mask leaves open compute too.
    strict = Config(Fn_compute_blocks=1, residual_diff_threshold=1e-9, steps_computation_mask=mask)
    assert probe.middle_runs(strict) == [True] * STEPS


def test_static_mask_caches_without_measuring(probe: Probe) -> None:
    mask = (1, 0, 0, 1, 0, 1, 0, 0)
    # A threshold no step meets: the static policy reuses on every 0 all the same.
    config = Config(
        Fn_compute_blocks=1,
        residual_diff_threshold=1e-9,
        steps_computation_mask=mask,
        steps_computation_policy="static",
    )
    assert probe.middle_runs(config) == [m == 1 for m in mask]


def test_the_calibrator_extrapolates_instead_of_reusing(probe: Probe) -> None:
    base = {**ALWAYS, "max_warmup_steps": 3, "max_continuous_cached_steps": 1}
    reuse, reuse_stats = session_run(probe.engine, probe.tp, Config(**base))
    first, first_stats = session_run(probe.engine, probe.tp, Config(**base, enable_taylorseer=True))
    second, _ = session_run(
        probe.engine, probe.tp, Config(**base, enable_taylorseer=True, taylorseer_order=2)
    )
    # The same steps reuse; what they put in the middle's place differs.
    assert _counts(reuse_stats) == _counts(first_stats)
    assert max_diff(reuse, first) > 1e-6 and max_diff(first, second) > 1e-6


def test_block_lists_cached_apart_decide_apart(pairs: RigFactory) -> None:
    """HunyuanVideo, F1B0: once both lists cached, each call runs the first block of each list."""
    pair = pairs("hunyuan_video", "distilled")
    _, stats = session_run(pair.engine, pair.tp, Config(**ALWAYS, max_warmup_steps=1))
    assert stats.blocks_computed == len(pair.engine.layout.blocks) + 2 * (STEPS - 1)


def test_cfg_branches_keep_their_own_state(pairs: RigFactory) -> None:
    """Wan with CFG as two calls: each branch computes its own first step, then reuses."""
    pair = pairs("wan", "separate")
    _, stats = session_run(pair.engine, pair.tp, Config(**ALWAYS, max_warmup_steps=1))
    blocks = len(pair.engine.layout.blocks)
    assert stats.denoiser_calls == 2 * STEPS
    assert stats.blocks_computed == 2 * blocks + (2 * STEPS - 2)


# -- isolation ---------------------------------------------------------------------------------------


def test_interleaved_sessions_give_their_sequential_outputs() -> None:
    """Two sessions on one transformer, in two threads, each step of one overlapping the other's."""
    config_a = Config(**PARITY_CONFIGS["F1B1-taylorseer2"])
    config_b = Config(**PARITY_CONFIGS["F1B1-limits"])
    (alone_a, alone_b), (together_a, together_b) = alone_and_in_lockstep(
        tiny("wan", "separate", steps=STEPS), config_a, config_b, seed_b=1
    )
    assert torch.equal(together_a, alone_a) and torch.equal(together_b, alone_b)
    assert not torch.equal(alone_a, alone_b)


def test_flux2_lists_are_chains_of_their_own() -> None:
    """Flux 2 joins text and image tokens between its lists: each list is a chain (as cache-dit has it)."""
    transformer = tiny_flux2()
    plain = flux2_call(transformer, 16)
    engine = ce.CacheEngine(transformer)
    try:
        assert [len(chain) for chain in chains(engine.layout)] == [2, 2]
        with engine.session(Config(**ALWAYS, max_warmup_steps=1)) as session:
            first, again = flux2_call(transformer, 16), flux2_call(transformer, 16)
    finally:
        engine.close()
    assert session.stats.blocks_computed == 4 + 2 and session.stats.blocks_reused == 2
    assert torch.equal(first, plain)
    torch.testing.assert_close(again, plain, rtol=0, atol=1e-5)
