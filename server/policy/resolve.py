"""A request's ``cache`` resolved to the engine config it runs on a model: the one way in, for a method
with its fields, a preset and a quality target alike.

Presets and targets are one kind of thing, a policy the model offers by name. On a model with a
calibration (``server/models/calibration.py``), a target's floor, or a preset's (``PRESET_FLOORS``),
picks, for the request's step count and guidance, the fastest guarded TaylorSeer whose pooled PSNR
against the uncached output meets the floor with 95% confidence and whose worst calibration prompt
keeps what the floor promises each prompt. The request also gets its own guard: an error budget at
which the calibration's line says it would fall under that per-prompt floor, past which it computes
every remaining step. The answer's
``cache_policy.target`` says which policy ran, what was measured for it, whether the request's setting
was the one calibrated or only the nearest to it, and, under a guard, the request's own estimate. On a
model without a calibration, a preset is the model's fixed config and a target is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cache_engine import CacheConfig
from server.errors import InvalidRequest
from server.models.calibration import TAIL_DB, TAIL_MARGIN_DB, EstimateFit, psnr_to_json
from server.models.presets import PresetName
from server.models.registry import ResidentModel
from server.policy.engine_config import describe, engine_config, to_engine_config
from server.protocol import CachePreset, CacheSpec, CacheTarget, NoCache

# The floor each preset keeps on a calibrated model: presets are targets on the same curve.
PRESET_FLOORS: dict[PresetName, float] = {"fast": 30.0, "balanced": 35.0, "quality": 40.0}


@dataclass(frozen=True)
class Resolved:
    """What a request's ``cache`` runs: the engine config, and, for a policy chosen from a PSNR floor,
    what the choice promises (the floor, what was measured, on which setting)."""

    config: CacheConfig | None
    promise: Mapping[str, Any] | None = None
    # The request's field that chose it, for an error about what it chose.
    param: str = "cache.method"
    # For a guarded policy chosen from a floor: how its own error estimate maps to PSNR.
    estimate: EstimateFit | None = None


def resolve(
    model: ResidentModel,
    spec: CacheSpec | None,
    steps: int,
    guidance_scale: float,
    loras: tuple[tuple[str, float], ...] = (),
) -> Resolved:
    """The engine config ``spec`` runs on ``model`` at ``steps`` and ``guidance_scale``, with the LoRA
    adapters (name, scale) the request applies: a target or preset uses the calibration measured with
    them (``ditcache calibrate --lora``) where there is one, else the base model's, saying so.

    Raises InvalidRequest naming the field: a preset the model lacks, a target on a model with no
    calibration, a value the engine refuses.
    """
    if spec is None or isinstance(spec, NoCache):
        return Resolved(None)
    if isinstance(spec, CacheTarget):
        return _chosen(model, spec.target.min_psnr, "cache.target", steps, guidance_scale, loras)
    if isinstance(spec, CachePreset):
        if model.calibration.curves:
            return _chosen(model, PRESET_FLOORS[spec.preset], "cache.preset", steps, guidance_scale, loras)
        if spec.preset not in model.presets:
            raise InvalidRequest(f"this model has no preset {spec.preset!r}", param="cache.preset")
        return Resolved(model.presets[spec.preset], param="cache.preset")
    return Resolved(to_engine_config(spec, model.method_values, steps=steps))


def presets(model: ResidentModel, methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """What each preset runs at the model's default steps and guidance, in the wire's vocabulary; a preset
    whose method is not among ``methods`` (those a request may name) is left out."""
    defaults = model.defaults
    described: dict[str, dict[str, Any]] = {}
    for name in PRESET_FLOORS:
        try:
            config = resolve(model, CachePreset(preset=name), defaults.steps, defaults.guidance_scale).config
        except InvalidRequest:
            continue  # no such preset on this model, or no calibrated policy at its floor
        if describe(config)["method"] in methods:
            described[name] = describe(config)
    return described


def method_defaults(model: ResidentModel, methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per method of ``methods``, what a request naming only that method runs on ``model`` at its default
    steps; a method left out needs a field this model cannot fill (MagCache's ``mag_ratios`` on a model
    never calibrated, TeaCache's ``coefficients`` on a family without published ones)."""
    described = {}
    for method in methods:
        if method == "none":
            continue
        try:
            config = engine_config(method, {}, model.method_values, steps=model.defaults.steps)
            model.cache.check(config)
        except (InvalidRequest, ValueError):
            continue
        described[method] = describe(config)
    return described


def _db(value: float) -> float | None:
    db = psnr_to_json(value)
    return None if db is None else round(db, 2)


def _chosen(
    model: ResidentModel,
    floor: float,
    param: str,
    steps: int,
    guidance_scale: float,
    loras: tuple[tuple[str, float], ...] = (),
) -> Resolved:
    adapted = model.adapter_calibration(loras)
    calibration = adapted or model.calibration
    choice = calibration.choose(floor, steps, guidance_scale > 1)
    if choice is None:
        raise InvalidRequest(
            f"model {model.name!r} has no calibration to choose a policy from; "
            f"run `ditcache calibrate --model {model.source.split(':', 1)[-1]}`, or name a method",
            param=param,
        )
    point, curve = choice.point, choice.curve
    promise: dict[str, Any] = {
        "min_psnr": floor,
        "measured_psnr": _db(point.psnr),
        # What the floor was held to: the PSNR other prompts keep with 95% confidence.
        "psnr_lower_bound": _db(point.psnr_bound),
        "worst_prompt_psnr": _db(point.worst_psnr),
        # What the tail was held to: all calibration prompts but one in a hundred kept this.
        "tail_psnr": _db(point.tail),
        "measured_speedup": round(point.speedup, 2),
        "calibrated": {
            "steps": curve.steps,
            "guidance_scale": curve.guidance_scale,
            "prompts": calibration.prompts,
        },
        # The request's setting is not the calibrated one (its steps and guidance, or adapters the
        # calibration ran without): the numbers are the nearest curve's, measured without them.
        "outside_calibration": not choice.exact or (bool(loras) and adapted is None),
    }
    if adapted is not None and adapted.adapter is not None:
        promise["calibrated"]["adapter"] = {"name": adapted.adapter[0], "scale": adapted.adapter[1]}
    if loras:
        promise["adapters"] = [name for name, _ in loras]
    fields = {name: value for name, value in point.policy.items() if name != "method"}
    method = str(point.policy["method"])
    fit = curve.estimate if method == "guarded_taylorseer" else None
    if fit is not None:
        budget = fit.error_at(floor - TAIL_DB + TAIL_MARGIN_DB)
        if budget is not None:
            fields["error_budget"] = round(budget, 4)
            promise["error_budget"] = fields["error_budget"]
    config = engine_config(method, fields, model.method_values, steps=steps)
    return Resolved(config, promise, param, fit)


def estimated_psnr(fit: EstimateFit, estimated_error: float) -> dict[str, float | None]:
    """What a guarded request's own estimate says of its PSNR, for its answer."""
    return {
        "estimated_error": round(estimated_error, 4),
        "estimated_psnr": _db(fit.psnr(estimated_error)),
        # How far the calibration's runs sat from the line: read the estimate to about this.
        "estimate_spread_db": round(fit.spread, 2),
    }
