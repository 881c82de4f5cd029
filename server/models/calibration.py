"""A model's calibration: measured speed against fidelity, and the per-checkpoint values some methods need.

``ditcache calibrate`` (``server/policy/calibrate.py``) writes it as JSON; the server loads it with the
model. It holds, per calibrated setting (step count, guidance on or off), one point per cache policy
swept: the policy as a request's ``cache`` would write it, its pooled PSNR against the uncached output
over the calibration prompts, the lower confidence bound of that PSNR for other prompts, its worst
prompt and its speedup; and the line from a guarded policy's own error estimate to its PSNR. A request's
``{"cache": {"target": {"min_psnr": 35}}}`` runs the fastest guarded point whose bound meets the floor
and whose worst prompt keeps what the floor promises each prompt, on the curve of its own setting or of
the nearest calibrated one, and says which. It also holds values a method needs per checkpoint
(MagCache's magnitude ratios, TeaCache's rescaling coefficients), which fill the fields a request leaves
out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from server.models.trajectories import TrajectoryRule

__all__ = [
    "FORMAT",
    "Calibration",
    "Choice",
    "Curve",
    "CurvePoint",
    "EstimateFit",
    "load_calibration",
    "psnr_from_json",
    "psnr_to_json",
    "tail_psnr",
]

# Bump when the file's layout changes; an older file is refused with a clear error, never misread.
FORMAT = 1


@dataclass(frozen=True)
class CurvePoint:
    # The policy as a request's ``cache`` writes it ({"method": "none"} for the uncached run).
    policy: Mapping[str, Any]
    # Pooled over the calibration prompts; inf when every output was identical to the uncached one.
    psnr: float
    speedup: float
    # The lowest per-prompt PSNR: what the policy does to the prompt it hurts most.
    worst_psnr: float
    # What the pooled PSNR is at least on other prompts like the calibration's, with 95% confidence:
    # the floor is held to this, not to ``psnr``. Per-prompt error is heavy-tailed, so a schedule that
    # hurts a few prompts badly has a wide spread and promises less than its pooled mean.
    psnr_bound: float
    # The per-prompt PSNR that all but ``TAIL_RATE`` of the calibration prompts keep (``tail_psnr``).
    # None in a file written before it was recorded: the worst prompt stands in, which is the same
    # number below 100 prompts.
    tail_psnr: float | None = None

    @property
    def tail(self) -> float:
        return self.worst_psnr if self.tail_psnr is None else self.tail_psnr


@dataclass(frozen=True)
class EstimateFit:
    """How a guarded policy's own estimate of its error (``estimated_error``) maps to the PSNR of its
    output against the uncached one, fitted over the calibration's guarded runs:
    ``psnr = intercept + slope * log10(estimated_error)``, give or take ``spread`` dB (the standard
    deviation of what the line leaves unexplained)."""

    intercept: float
    slope: float
    spread: float
    runs: int

    def psnr(self, estimated_error: float) -> float:
        if estimated_error <= 0:
            return math.inf
        return self.intercept + self.slope * math.log10(estimated_error)

    def error_at(self, psnr: float) -> float | None:
        """The estimate at which the line reaches ``psnr``; None when the line does not fall with the
        estimate (a fit that cannot bound anything)."""
        if self.slope >= 0:
            return None
        return float(10 ** ((psnr - self.intercept) / self.slope))


# What a target picks from: the one method under a per-request guard. A fixed schedule (TaylorSeer, PAB,
# FasterCache) or one fixed per checkpoint (MagCache's ratios) is blind to the prompt; thresholds on
# activations follow it but keep no budget, and their tail moved most on prompts the calibration never
# saw (DBCache at 30 dB on shapes-flux: worst calibration prompt 28 dB, worst held-out 16 dB).
TARGET_METHODS = frozenset({"guarded_taylorseer"})
# What a floor promises of each prompt: none falls more than this under it.
TAIL_DB = 5.0
# The calibration's tail must keep this much more, for prompts it did not see.
TAIL_MARGIN_DB = 1.0
# The tail is the prompts a policy serves worst, as a rate: at most this share of the calibration
# prompts may fall under what the floor keeps. Below 100 prompts no prompt may (the worst decides);
# a wider calibration lets one swinging prompt in a hundred through instead of ruling out every fast
# policy for it.
TAIL_RATE = 0.01


def tail_psnr(per_prompt_psnr: Sequence[float]) -> float:
    """The PSNR that all but ``TAIL_RATE`` of these prompts keep: the (floor(rate * n) + 1)-th lowest."""
    ordered = sorted(per_prompt_psnr)
    return ordered[min(int(TAIL_RATE * len(ordered)), len(ordered) - 1)]


@dataclass(frozen=True)
class Curve:
    steps: int
    # True when the calibrated runs used guidance (an extra pass per step); it changes the curve.
    guidance: bool
    guidance_scale: float
    points: tuple[CurvePoint, ...]
    # Fitted when the sweep ran guarded policies: what their estimate says of their PSNR.
    estimate: EstimateFit | None = None

    def fastest(self, min_psnr: float) -> CurvePoint | None:
        """The fastest point a target of ``min_psnr`` may run: a guarded policy (``TARGET_METHODS``), whose
        pooled PSNR meets the floor with 95% confidence and whose tail (all calibration prompts but
        ``TAIL_RATE`` of them) stays within what the floor promises of each prompt: the tail, not the
        mean, decides."""
        meeting = [
            point
            for point in self.points
            if point.policy.get("method") in TARGET_METHODS
            and point.psnr_bound >= min_psnr
            and point.tail >= min_psnr - TAIL_DB + TAIL_MARGIN_DB
        ]
        return max(meeting, key=lambda point: point.speedup, default=None)


@dataclass(frozen=True)
class Choice:
    point: CurvePoint
    curve: Curve
    # False when the request's steps or guidance differ from the curve's: the promise is then the
    # nearest calibrated one, not a measurement of this setting.
    exact: bool


@dataclass(frozen=True)
class Calibration:
    model: str
    prompts: int
    curves: tuple[Curve, ...] = ()
    # Per method, per config field: values measured for this checkpoint.
    method_values: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    # How far a prompt may start along a similar earlier prompt's trajectory; None: not calibrated.
    trajectory_rule: TrajectoryRule | None = None
    # The LoRA adapter (name, scale) the model was measured with (`ditcache calibrate --lora`); None: the
    # base model.
    adapter: tuple[str, float] | None = None

    def choose(self, min_psnr: float, steps: int, guidance: bool) -> Choice | None:
        """The fastest point meeting ``min_psnr`` on the curve nearest to (steps, guidance); None
        when nothing is calibrated. The uncached point meets any floor, so a curve always answers."""
        if not self.curves:
            return None
        curve = min(
            self.curves,
            key=lambda c: (c.guidance != guidance, abs(math.log(c.steps / steps))),
        )
        point = curve.fastest(min_psnr)
        if point is None:
            point = CurvePoint({"method": "none"}, math.inf, 1.0, math.inf, math.inf)
        return Choice(point, curve, exact=curve.steps == steps and curve.guidance == guidance)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "prompts": self.prompts,
            "method_values": {method: dict(values) for method, values in self.method_values.items()},
            "trajectory_rule": None if self.trajectory_rule is None else self.trajectory_rule.to_json(),
            "adapter": None if self.adapter is None else {"name": self.adapter[0], "scale": self.adapter[1]},
            "curves": [
                {
                    "steps": curve.steps,
                    "guidance": curve.guidance,
                    "guidance_scale": curve.guidance_scale,
                    "estimate": None if curve.estimate is None else asdict(curve.estimate),
                    "points": [_point_json(point) for point in curve.points],
                }
                for curve in self.curves
            ],
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(path.suffix + ".partial")
        staging.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        staging.replace(path)


def _point_json(point: CurvePoint) -> dict[str, Any]:
    written = {
        "policy": dict(point.policy),
        "psnr": psnr_to_json(point.psnr),
        "speedup": point.speedup,
        "worst_psnr": psnr_to_json(point.worst_psnr),
        "psnr_bound": psnr_to_json(point.psnr_bound),
    }
    # Left out when unknown: null already means "identical to the uncached output".
    if point.tail_psnr is not None:
        written["tail_psnr"] = psnr_to_json(point.tail_psnr)
    return written


def psnr_to_json(value: float) -> float | None:
    """JSON has no infinity: null stands for "identical to the uncached output"."""
    return None if math.isinf(value) else value


def psnr_from_json(value: Any) -> float:
    """The inverse of ``psnr_to_json``."""
    return math.inf if value is None else float(value)


def from_json(data: Mapping[str, Any]) -> Calibration:
    if data.get("format") != FORMAT:
        raise ValueError(f"calibration format {data.get('format')!r}; this server reads format {FORMAT}")
    curves = tuple(
        Curve(
            steps=int(curve["steps"]),
            guidance=bool(curve["guidance"]),
            guidance_scale=float(curve["guidance_scale"]),
            estimate=None if curve.get("estimate") is None else EstimateFit(**curve["estimate"]),
            points=tuple(
                CurvePoint(
                    policy=MappingProxyType(dict(point["policy"])),
                    psnr=psnr_from_json(point["psnr"]),
                    speedup=float(point["speedup"]),
                    worst_psnr=psnr_from_json(point["worst_psnr"]),
                    # Written before bounds were recorded: such a file promises its pooled PSNR, as
                    # it did; `ditcache calibrate` adds the bound from its work file without running again what it measured.
                    psnr_bound=psnr_from_json(point.get("psnr_bound", point["psnr"])),
                    tail_psnr=psnr_from_json(point["tail_psnr"]) if "tail_psnr" in point else None,
                )
                for point in curve["points"]
            ),
        )
        for curve in data.get("curves", ())
    )
    values = {
        method: MappingProxyType(dict(fields)) for method, fields in data.get("method_values", {}).items()
    }
    return Calibration(
        model=str(data["model"]),
        prompts=int(data.get("prompts", 0)),
        curves=curves,
        method_values=MappingProxyType(values),
        trajectory_rule=None
        if data.get("trajectory_rule") is None
        else TrajectoryRule.from_json(data["trajectory_rule"]),
        adapter=None
        if data.get("adapter") is None
        else (str(data["adapter"]["name"]), float(data["adapter"]["scale"])),
    )


def load_calibration(path: Path) -> Calibration:
    """Raises ValueError for a file that is not a calibration this server reads."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the calibration {path}: {exc}") from exc
    try:
        return from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a calibration: {exc}") from exc


def merged(curves: Sequence[Curve], new: Curve) -> tuple[Curve, ...]:
    """``curves`` with ``new`` in place of any curve of the same setting."""
    kept = [curve for curve in curves if (curve.steps, curve.guidance) != (new.steps, new.guidance)]
    return (*kept, new)
