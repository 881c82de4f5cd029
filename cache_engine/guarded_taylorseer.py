"""Guarded TaylorSeer: TaylorSeer lite whose reuse follows the request's own prediction error.

A fixed TaylorSeer schedule predicts every N-th step whatever the prompt does; a prompt whose output
bends sharply between full steps is predicted as badly as the calibration's gentlest one. Here each
step the transformer runs in full is also a check: the Taylor series is asked what it would have
predicted for that step, and the relative error of that prediction against what was computed says
how fast this request's output bends. Prediction error of an order-``p`` series grows as the
distance from the last full step to the power ``p + 1``, so that one measurement gives the error the
next predicted steps will take. A step is predicted only while:

- its estimated error stays within ``step_tolerance``, and
- the request's whole estimate, the sum of the errors of every step it predicted, stays within
  ``error_budget``.

Each check also corrects what the steps predicted since the last one were estimated to cost: a
request whose trajectory turns sharply spends its budget and runs in full from then on. The sum is
the request's own estimate of how far its output drifted from the uncached one; a calibration maps
it to PSNR (``estimated_error``).

Guidance passes (cond, uncond) share one schedule, so every pass of a step is predicted or computed
together; each pass keeps its own Taylor factors, and a check takes the larger of their errors.

Not in diffusers or cache-dit: its parts are TaylorSeer's lite mode (blocks skipped, ``proj_out``
predicted) and the runtime-adaptive schedules of EasyCache and TeaCache, with the error measured on
the prediction itself rather than on a proxy input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _validation as check
from ._fields import documented
from .errors import InvalidConfigValue, UnsupportedMethodError
from .session import CacheSession, Handler, ModuleCall, Plan, decide_and_record
from .targets import ModelLayout
from .taylorseer_cache import _State, lite_skipped

NAME = "guarded_taylorseer"


@dataclass(frozen=True)
class GuardedTaylorSeerCacheConfig:
    step_tolerance: float = documented(
        0.05,
        "The largest estimated relative error (L2, against the computed output) a predicted step may "
        "take; smaller keeps closer to the uncached output and computes more steps.",
    )
    error_budget: float | None = documented(
        None,
        "The most the request's estimate (the sum of its predicted steps' estimated errors) may reach; "
        "once it would pass it, every remaining step computes in full. None: no budget.",
    )
    max_interval: int = documented(
        6,
        "The longest run between two full steps: at most N - 1 steps in a row are predicted.",
    )
    disable_cache_before_step: int = documented(
        3,
        "Steps 0 to N - 1 always compute in full, gathering the Taylor factors and the first check; "
        "prediction may begin at step N.",
    )
    max_order: int = documented(
        1,
        "Order of the Taylor expansion that predicts proj_out's output (0: reuse the last output).",
    )
    taylor_factors_dtype: torch.dtype | None = documented(
        torch.float32,
        "Dtype in which the Taylor factors are stored. None: the module output's own dtype.",
    )

    def __post_init__(self) -> None:
        check.number("step_tolerance", self.step_tolerance, minimum=0)
        if self.error_budget is not None:
            check.number("error_budget", self.error_budget, minimum=0)
        check.positive_int("max_interval", self.max_interval)
        check.non_negative_int("disable_cache_before_step", self.disable_cache_before_step)
        check.non_negative_int("max_order", self.max_order)
        if self.disable_cache_before_step < self.max_order + 2:
            # The first check needs a full series (max_order + 1 full steps) and one more full step.
            raise InvalidConfigValue(
                f"disable_cache_before_step must be at least max_order + 2 = {self.max_order + 2} "
                f"(the full steps the first check needs), got {self.disable_cache_before_step}",
                field="disable_cache_before_step",
            )
        check.optional_dtype("taylor_factors_dtype", self.taylor_factors_dtype)


class _Guard:
    """One request's schedule, shared by its guidance passes: which steps are predicted, and what
    they are estimated to have cost."""

    __slots__ = ("checked_step", "decisions", "last_full_step", "pending", "rate", "settled", "spent")

    def __init__(self) -> None:
        self.decisions: dict[int, bool] = {}
        self.last_full_step = -1
        # Error per unit of distance ** (order + 1), measured by the latest check; None before the first.
        self.rate: float | None = None
        self.checked_step = -1
        # The steps predicted since the latest full step, as (distance from it, error estimated when
        # decided); and the distances of those the latest check settled.
        self.pending: list[tuple[int, float]] = []
        self.settled: list[int] = []
        # The request's estimate: the sum of its predicted steps' errors.
        self.spent = 0.0


class _Schedule:
    """The plan's shared part: the config, and the owner of each request's guard."""

    def __init__(self, config: GuardedTaylorSeerCacheConfig) -> None:
        self.config = config
        self.power = config.max_order + 1

    def guard(self, session: CacheSession) -> _Guard:
        return session.shared_state(self, _Guard)

    def predicts(self, session: CacheSession, step: int) -> bool:
        """Whether ``step`` is predicted; decided once, by the first pass to reach it."""
        guard = self.guard(session)
        decided = guard.decisions.get(step)
        if decided is not None:
            return decided
        config = self.config
        predict = False
        if step >= config.disable_cache_before_step and guard.rate is not None:
            distance = step - guard.last_full_step
            estimated = guard.rate * distance**self.power
            budget = config.error_budget
            predict = (
                distance < config.max_interval
                and estimated <= config.step_tolerance
                and (budget is None or guard.spent + estimated <= budget)
            )
            if predict:
                guard.spent += estimated
                guard.pending.append((distance, estimated))
        if not predict:
            guard.last_full_step = step
        guard.decisions[step] = predict
        return predict

    def check(self, session: CacheSession, step: int, error: float, distance: int) -> None:
        """A full ``step``'s check: the relative ``error`` the series would have made ``distance`` steps
        from its last full step. It measures how this request's output bends over the interval just
        run, so it settles what that interval's predicted steps cost, and sets the next decisions."""
        guard = self.guard(session)
        rate = error / distance**self.power
        if guard.checked_step == step:
            # Another pass of the same step: the schedule follows the pass that bends most.
            if guard.rate is not None and rate > guard.rate:
                guard.spent += (rate - guard.rate) * sum(d**self.power for d in guard.settled)
                guard.rate = rate
            return
        guard.spent += sum(rate * d**self.power - estimated for d, estimated in guard.pending)
        guard.settled = [d for d, _ in guard.pending]
        guard.pending = []
        guard.rate = rate
        guard.checked_step = step


class _Handler:
    """TaylorSeer lite's handler on one module, predicting when the request's guard says so."""

    def __init__(self, schedule: _Schedule, *, is_inactive: bool) -> None:
        self.schedule = schedule
        self.is_inactive = is_inactive

    def _new_state(self) -> _State:
        config = self.schedule.config
        return _State(config.taylor_factors_dtype, config.max_order, self.is_inactive)

    def decide(self, session: CacheSession, module: nn.Module) -> Any:
        state = session.state(self, self._new_state)
        state.current_step += 1
        # A pass with nothing recorded yet (its first step) computes whatever the schedule says.
        if state.last_update_step is None or not self.schedule.predicts(session, state.current_step):
            return None
        predicted = state.predict()
        return predicted[0] if len(predicted) == 1 else tuple(predicted)

    def record(self, session: CacheSession, module: nn.Module, output: Any, computed: bool) -> None:
        if not computed:
            return
        state = session.state(self, self._new_state)
        outputs = (output,) if isinstance(output, torch.Tensor) else tuple(output)
        if not self.is_inactive and state.last_update_step is not None:
            self._check(session, state, outputs)
        state.update(outputs)

    def _check(self, session: CacheSession, state: _State, outputs: tuple[torch.Tensor | None, ...]) -> None:
        # Only a full series predicts as the schedule will: the first full steps are not checks.
        if any(
            len(state.factors.get(i, ())) <= state.max_order for i, o in enumerate(outputs) if o is not None
        ):
            return
        assert state.last_update_step is not None
        pairs = [
            (guess.float(), actual.float())
            for guess, actual in zip(state.predict(), outputs, strict=True)
            if guess is not None and actual is not None
        ]
        if not pairs:
            return
        sums = torch.zeros(2, device=pairs[0][1].device)
        for guess, actual in pairs:
            sums += torch.stack([(guess - actual).square().sum(), actual.square().sum()])
        # One read back from the device per check, not two per output.
        squared_error, squared_norm = sums.tolist()
        if squared_norm > 0:
            distance = state.current_step - state.last_update_step
            error = math.sqrt(squared_error / squared_norm)
            self.schedule.check(session, state.current_step, error, distance)

    def __call__(self, call: ModuleCall) -> Any:
        return decide_and_record(self, call)


def plan(config: GuardedTaylorSeerCacheConfig, layout: ModelLayout) -> Plan:
    schedule = _Schedule(config)
    handlers: dict[nn.Module, Handler] = {}
    predicted = 0
    for name, module in layout.modules.items():
        if lite_skipped(name, layout):
            handlers[module] = _Handler(schedule, is_inactive=True)
        elif name == layout.output_head:
            handlers[module] = _Handler(schedule, is_inactive=False)
            predicted += 1
    if not predicted:
        raise UnsupportedMethodError(NAME, layout, "found no output projection to predict")
    if layout.family.other_output_heads:
        raise UnsupportedMethodError(
            NAME,
            layout,
            f"it predicts the output projection alone, and {layout.family.other_output_heads[0]} also reads "
            "the blocks' output",
        )
    return Plan(method=NAME, handlers=handlers, estimate=lambda session: schedule.guard(session).spent)
