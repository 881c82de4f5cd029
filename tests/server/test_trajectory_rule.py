"""The trajectory rule: measured on a real tiny model, fitted from the pairs' PSNR at each kept step."""

from __future__ import annotations

import json
import math
from pathlib import Path

from server.models.calibration import load_calibration
from server.models.trajectories import DEFAULT_RULE, KEPT_FRACTIONS, kept_steps
from server.policy.calibrate import main as calibrate_main
from server.policy.trajectory_rule import MIN_PAIRS, TAIL_RATE, PairMeasure, fit_rule

STEPS = 20
KEPT = kept_steps(STEPS)


def _pair(similarity: float, lasts_to: int) -> PairMeasure:
    """A pair that keeps 40 dB up to step ``lasts_to`` and falls to 20 dB after it."""
    return PairMeasure(similarity, {step: 40.0 if step <= lasts_to else 20.0 for step in KEPT})


def test_each_similarity_skips_the_most_its_pairs_keep_the_floor_at() -> None:
    pairs = [_pair(0.995, 10) for _ in range(MIN_PAIRS)] + [_pair(0.92, 4) for _ in range(MIN_PAIRS)]
    rule = fit_rule(pairs, STEPS, floor_psnr=30.0)
    # At 0.99 and above only the first kind: step 10 of 20. From 0.9 the second kind joins: step 4.
    assert dict(rule.points) == {
        0.99: 0.5,
        0.98: 0.5,
        0.95: 0.5,
        0.9: 0.2,
        0.85: 0.2,
        0.8: 0.2,
        0.7: 0.2,
        0.6: 0.2,
        0.5: 0.2,
    }
    assert rule.share(0.993) == 0.5 and rule.share(0.93) == 0.2 and rule.share(0.4) == 0.0
    assert rule.same_prompt == max(KEPT_FRACTIONS) and rule.pairs == 2 * MIN_PAIRS


def test_a_tail_of_pairs_under_the_floor_is_allowed_up_to_its_rate() -> None:
    count = 20
    allowed = int(TAIL_RATE * count)
    kept = [_pair(0.95, 14) for _ in range(count - allowed)]
    assert fit_rule(kept + [_pair(0.95, 2)] * allowed, STEPS).share(0.95) == 0.7
    assert fit_rule(kept[1:] + [_pair(0.95, 2)] * (allowed + 1), STEPS).share(0.95) == 0.1


def test_a_similarity_with_too_few_pairs_has_no_point_and_none_keep_nothing() -> None:
    assert fit_rule([_pair(0.995, 18)] * (MIN_PAIRS - 1), STEPS).points == ()
    never = PairMeasure(0.99, dict.fromkeys(KEPT, 10.0))
    assert fit_rule([never] * MIN_PAIRS, STEPS).points == ()


def test_calibrate_measures_the_rule_on_the_model_and_keeps_the_policy_curves(
    model_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "calibration.json"
    code = calibrate_main(
        [
            "--model",
            "tiny-flux",
            "--trajectories",
            "--prompts",
            "4",
            "--steps",
            "5",
            "--out",
            str(out),
            "--cache-dir",
            str(model_cache),
        ]
    )
    assert code == 0
    calibration = load_calibration(out)
    assert calibration.trajectory_rule is not None and calibration.trajectory_rule != DEFAULT_RULE
    measured = json.loads(out.with_suffix(".trajectories.json").read_text())
    assert measured["steps"] == 5 and len(measured["prompts"]) == 4
    # Each prompt with its 3 nearest others, and none left to draw at random.
    assert len(measured["pairs"]) == 4 * 3 == calibration.trajectory_rule.pairs
    for pair in measured["pairs"]:
        assert -1.0 <= pair["similarity"] <= 1.0 + 1e-6
        assert set(pair["psnr"]) == {str(step) for step in kept_steps(5)}
        values = [math.inf if v is None else v for v in pair["psnr"].values()]
        assert all(v > 0 for v in values)
