"""A request's ``target`` (and, on a calibrated model, its ``preset``) resolved to a measured policy.

The model's calibration (``server/calibration.py``) gives, for the request's step count and guidance,
the fastest policy whose pooled PSNR against the uncached output meets the floor with 95% confidence
on prompts other than the calibration's. The answer's
``cache_policy`` says which policy ran, what was measured for it, and whether the request's setting
was the one calibrated or only the nearest to it.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from server.errors import InvalidRequest
from server.models.calibration import psnr_to_json
from server.models.registry import ResidentModel
from server.protocol import CachePreset, CacheSpec, CacheTarget

# The floor each preset keeps on a calibrated model: presets are targets on the same curve.
PRESET_FLOORS: dict[str, float] = {"fast": 30.0, "balanced": 35.0, "quality": 40.0}

_SPEC: TypeAdapter[CacheSpec] = TypeAdapter(CacheSpec)


def _db(value: float) -> float | None:
    db = psnr_to_json(value)
    return None if db is None else round(db, 2)


def resolve(
    model: ResidentModel, spec: CacheSpec | None, steps: int, guidance_scale: float
) -> tuple[CacheSpec | None, dict[str, Any] | None]:
    """The policy to run for ``spec`` and, when it was chosen from a floor, what the choice promises."""
    if isinstance(spec, CacheTarget):
        floor, param = spec.target.min_psnr, "cache.target"
    elif isinstance(spec, CachePreset) and model.calibration.curves:
        floor, param = PRESET_FLOORS[spec.preset], "cache.preset"
    else:
        return spec, None
    choice = model.calibration.choose(floor, steps, guidance_scale > 1)
    if choice is None:
        raise InvalidRequest(
            f"model {model.name!r} has no calibration to choose a policy from; "
            f"run `ditcache calibrate --model {model.source.split(':', 1)[-1]}`, or name a method",
            param=param,
        )
    point, curve = choice.point, choice.curve
    promise = {
        "min_psnr": floor,
        "measured_psnr": _db(point.psnr),
        # What the floor was held to: the PSNR other prompts keep with 95% confidence.
        "psnr_lower_bound": _db(point.psnr_bound),
        "worst_prompt_psnr": _db(point.worst_psnr),
        "measured_speedup": round(point.speedup, 2),
        "calibrated": {
            "steps": curve.steps,
            "guidance_scale": curve.guidance_scale,
            "prompts": model.calibration.prompts,
        },
        # The request's setting is not the calibrated one: the numbers are the nearest curve's.
        "outside_calibration": not choice.exact,
    }
    return _SPEC.validate_python(dict(point.policy)), promise


def calibrated_presets(model: ResidentModel) -> dict[str, dict[str, Any]] | None:
    """What each preset runs at the model's default steps and guidance, on a calibrated model (None:
    not calibrated, the presets are the model's fixed configs)."""
    if not model.calibration.curves:
        return None
    defaults = model.defaults
    chosen = {}
    for name, floor in PRESET_FLOORS.items():
        choice = model.calibration.choose(floor, defaults.steps, defaults.guidance_scale > 1)
        if choice is not None:
            chosen[name] = dict(choice.point.policy)
    return chosen
