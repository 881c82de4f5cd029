"""TeaCache's calibration mode: what its rescaling polynomial is fitted to, and the fit itself."""

from __future__ import annotations

import numpy as np
import pytest

import cache_engine as ce
from cache_engine.teacache import calibration_pairs, fit_coefficients
from tests.cache_engine.pipelines import run
from tests.cache_engine.support import assert_invalid, max_diff, tiny

STEPS = 6


def test_the_fit_recovers_a_known_polynomial() -> None:
    truth = np.poly1d([3.0, -2.0, 0.5, 0.01])
    x = np.linspace(0.01, 0.5, 40)
    fitted = fit_coefficients(list(zip(x, truth(x), strict=True)), degree=3)
    assert np.allclose(fitted, truth.coeffs, atol=1e-8)


def test_too_few_pairs_for_the_degree_are_refused() -> None:
    with pytest.raises(ValueError, match="more than 4 pairs"):
        fit_coefficients([(0.1, 0.2)] * 4)


def test_calibrate_must_be_a_boolean() -> None:
    assert_invalid(ce.TeaCacheConfig, "calibrate", "yes")


@pytest.mark.parametrize(
    ("family", "cfg", "branches"), [("flux", "separate", 2), ("flux", "distilled", 1), ("wan", "separate", 2)]
)
def test_calibrating_computes_everything_and_records_each_branchs_changes(
    family: str, cfg: str, branches: int
) -> None:
    tp = tiny(family, cfg, steps=STEPS)
    uncached = run(tp)
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        with engine.session(ce.TeaCacheConfig(calibrate=True)) as session:
            calibrated = run(tp)
            pairs = calibration_pairs(session)
        assert session.stats.blocks_reused == 0
        assert max_diff(calibrated, uncached) == 0.0
        # One pair per call after a branch's first: the change since that branch's previous call.
        assert len(pairs) == branches * (STEPS - 1)
        assert all(x > 0 and y > 0 for x, y in pairs)
        with engine.session(
            ce.TeaCacheConfig(rel_l1_thresh=0.5, coefficients=fit_coefficients(pairs))
        ) as session:
            run(tp)
        assert session.stats.blocks_reused > 0
    finally:
        engine.close()


def test_pairs_come_only_from_a_calibrating_session() -> None:
    tp = tiny("flux", "separate", steps=STEPS)
    engine = ce.CacheEngine(tp.pipe.transformer)
    try:
        with engine.session(ce.TeaCacheConfig(coefficients=(1.0, 0.0))) as session, pytest.raises(ValueError):
            calibration_pairs(session)
    finally:
        engine.close()
