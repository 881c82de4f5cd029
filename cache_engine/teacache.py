"""TeaCache: skip every block while the first block's timestep-modulated input has barely moved.

Per denoiser call and branch, the relative L1 change of the first block's timestep-modulated input
(since the previous call) is rescaled by a polynomial fitted to the model and added to an
accumulator. While the accumulator stays under ``rel_l1_thresh`` the blocks are replaced by the
residual they added the last time they ran; once it reaches the threshold they run and it restarts
from zero. The first call always runs, and so does the last one of ``num_steps`` when it is given.

The polynomial comes from the config's ``coefficients``, else from the family table (the paper's, for
the families it fits one for); a model with neither needs them given (or fitted by a calibration run).

``calibrate=True`` measures what the polynomial is fitted to instead: every call runs, and each branch
records, from one call to the next, the relative L1 change of the first block's modulated input and of
the denoiser's output (:func:`calibration_pairs`); :func:`fit_coefficients` fits the polynomial to
them, as the paper's scripts do with ``numpy.polyfit``.

Departures from the paper's scripts: state is kept per CFG branch (they count the cond and uncond calls
of one step as two steps); ``rel_l1_thresh=0`` computes every call (theirs still skips where the fitted
polynomial is negative); where a family's hidden states change layout between block lists (Flux 2),
each list carries its own residual, applied where the list starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _validation as check
from ._fields import documented
from .errors import InvalidConfigValue, UnsupportedMethodError, require_block_chain
from .session import CacheSession, Handler, ModuleCall, Plan
from .targets import BlockSite, ModelLayout, has_modulated_input, modulated_input

NAME = "teacache"


@dataclass(frozen=True)
class TeaCacheConfig:
    """The paper's parameters: ``rel_l1_thresh``, the rescaling ``coefficients`` and ``num_steps``.

    ``coefficients`` are a polynomial's, highest power first (``numpy.poly1d`` order), as published.
    """

    rel_l1_thresh: float = documented(
        0.25,
        "Skip the blocks while the accumulated rescaled relative L1 change of the first block's "
        "timestep-modulated input stays below this; 0 never skips.",
    )
    coefficients: tuple[float, ...] | None = documented(
        None,
        "The polynomial that rescales the relative L1 change, highest power first (numpy.poly1d order). "
        "None: the family's published one; planning refuses the config on a family that has none.",
    )
    num_steps: int | None = documented(
        None,
        "The run's steps: when given, the last one always computes (and the count restarts after it). "
        "None: only the first call is forced.",
    )
    calibrate: bool = documented(
        False,
        "Skip nothing and record what the polynomial is fitted to instead: each branch's relative L1 "
        "changes of the first block's modulated input and of the output, returned by "
        "cache_engine.teacache.calibration_pairs.",
    )

    def __post_init__(self) -> None:
        check.number("rel_l1_thresh", self.rel_l1_thresh, minimum=0.0)
        object.__setattr__(self, "coefficients", _coefficients(self.coefficients))
        check.positive_int("num_steps", self.num_steps, optional=True)
        if not isinstance(self.calibrate, bool):
            raise InvalidConfigValue(
                f"calibrate must be a boolean, got {self.calibrate!r}", field="calibrate"
            )


def _coefficients(value: Any) -> tuple[float, ...] | None:
    name = "coefficients"
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidConfigValue(f"{name} must be a list of numbers, got {value!r}", field=name)
    coefficients = tuple(value)
    if not coefficients:
        raise InvalidConfigValue(f"{name} must not be empty", field=name)
    for coefficient in coefficients:
        if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)):
            raise InvalidConfigValue(f"{name} must contain numbers, got {coefficient!r}", field=name)
        if not math.isfinite(coefficient):
            raise InvalidConfigValue(f"{name} must be finite, got {coefficient!r}", field=name)
    return tuple(float(c) for c in coefficients)


def rescale(coefficients: tuple[float, ...], x: float) -> float:
    """The polynomial at ``x``, by Horner's rule in float64, as ``numpy.poly1d`` evaluates it."""
    y = 0.0
    for coefficient in coefficients:
        y = y * x + coefficient
    return y


class _State:
    """One branch's accumulator and residuals, shared by every block of the model."""

    __slots__ = ("accumulated", "calls", "previous_modulated", "residuals", "run_inputs", "should_compute")

    def __init__(self, runs: int) -> None:
        self.calls = 0
        self.accumulated = 0.0
        self.previous_modulated: torch.Tensor | None = None
        self.should_compute = True
        # Per run of blocks: the streams entering it on this call, and what it added last time it ran.
        self.run_inputs: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * runs
        self.residuals: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * runs


# Compared by identity: it keys the session's state, one per plan.
@dataclass(frozen=True, eq=False)
class _Policy:
    threshold: float
    coefficients: tuple[float, ...]
    num_steps: int | None
    runs: int

    def new_state(self) -> _State:
        return _State(self.runs)


class _BlockHandler:
    """Every block of the model: the first decides, each run's first applies its residual on a skip."""

    def __init__(self, site: BlockSite, policy: _Policy, run: int, *, first: bool, last: bool) -> None:
        self.site = site
        self.policy = policy
        self.run = run
        self.decides = run == 0 and first
        self.first = first
        self.last = last

    def __call__(self, call: ModuleCall) -> Any:
        state = call.session.state(self.policy, self.policy.new_state)
        site = self.site
        if self.decides:
            state.should_compute = self._should_compute(state, modulated_input(site, call.args, call.kwargs))
        if not state.should_compute:
            hidden, encoder = site.inputs(call.args, call.kwargs)
            if self.first:
                residual = state.residuals[self.run]
                assert residual is not None
                hidden = hidden + residual[0]
                if encoder is not None and residual[1] is not None:
                    encoder = encoder + residual[1]
            return site.pack(hidden, encoder)
        if self.first:
            state.run_inputs[self.run] = site.inputs(call.args, call.kwargs)
        output = call.run()
        if self.last:
            run_input = state.run_inputs[self.run]
            assert run_input is not None
            state.run_inputs[self.run] = None
            hidden, encoder = site.streams(output)
            encoder_residual = None if encoder is None or run_input[1] is None else encoder - run_input[1]
            state.residuals[self.run] = (hidden - run_input[0], encoder_residual)
        return output

    def _should_compute(self, state: _State, modulated: torch.Tensor) -> bool:
        policy = self.policy
        position = state.calls if policy.num_steps is None else state.calls % policy.num_steps
        state.calls += 1
        previous, state.previous_modulated = state.previous_modulated, modulated
        forced = position == 0 or position == (policy.num_steps or 0) - 1
        # Another shape (a new resolution in the same session) has nothing to compare with.
        if forced or previous is None or previous.shape != modulated.shape:
            state.accumulated = 0.0
            return True
        change = _relative_l1(modulated, previous)
        state.accumulated += rescale(policy.coefficients, change)
        reusable = all(residual is not None for residual in state.residuals)
        if policy.threshold <= 0.0 or state.accumulated >= policy.threshold or not reusable:
            state.accumulated = 0.0
            return True
        return False


def runs(layout: ModelLayout) -> tuple[tuple[BlockSite, ...], ...]:
    """The runs of blocks one residual spans: all blocks, split where the streams change layout."""
    return layout.stream_chains


def coefficients_for(config: TeaCacheConfig, layout: ModelLayout) -> tuple[float, ...]:
    coefficients = config.coefficients or layout.family.teacache_coefficients
    if coefficients is None:
        raise InvalidConfigValue(
            f"coefficients are required: TeaCache publishes none for {type(layout.denoiser).__name__} "
            f"(family {layout.family.name}); give the rescaling polynomial fitted for this model",
            field="coefficients",
        )
    return coefficients


def plan(config: TeaCacheConfig, layout: ModelLayout) -> Plan:
    block_runs = runs(layout)
    if sum(len(run) for run in block_runs) < 2:
        raise UnsupportedMethodError(NAME, layout, "needs at least two transformer blocks")
    require_block_chain(NAME, layout)
    first = block_runs[0][0]
    if not has_modulated_input(first):
        raise UnsupportedMethodError(
            NAME, layout, f"the timestep-modulated input of a {type(first.module).__name__} is not known"
        )
    if config.calibrate:
        recorder = _Recorder()
        return Plan(
            method=NAME,
            handlers={
                first.module: _ObservedBlock(first, recorder),
                layout.denoiser: _ObservedDenoiser(recorder),
            },
        )
    policy = _Policy(
        threshold=float(config.rel_l1_thresh),
        coefficients=coefficients_for(config, layout),
        num_steps=config.num_steps,
        runs=len(block_runs),
    )
    handlers: dict[nn.Module, Handler] = {}
    for index, run in enumerate(block_runs):
        for position, site in enumerate(run):
            handlers[site.module] = _BlockHandler(
                site, policy, index, first=position == 0, last=position == len(run) - 1
            )
    return Plan(method=NAME, handlers=handlers)


# -- calibration: what the rescaling polynomial is fitted to -----------------------------------------


def _relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


class _Observed:
    """One branch's last modulated input and output, to compare the next call's with."""

    __slots__ = ("modulated", "previous_modulated", "previous_output")

    def __init__(self) -> None:
        self.modulated: torch.Tensor | None = None
        self.previous_modulated: torch.Tensor | None = None
        self.previous_output: torch.Tensor | None = None


# Compared by identity: it keys the session's state (each branch's _Observed, and the shared pairs).
class _Recorder:
    pass


def _pairs() -> list[tuple[float, float]]:
    return []


class _ObservedBlock:
    def __init__(self, site: BlockSite, recorder: _Recorder) -> None:
        self.site = site
        self.recorder = recorder

    def __call__(self, call: ModuleCall) -> Any:
        state = call.session.state(self.recorder, _Observed)
        state.modulated = modulated_input(self.site, call.args, call.kwargs).detach()
        return call.run()


class _ObservedDenoiser:
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def __call__(self, call: ModuleCall) -> Any:
        output = call.run()
        sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        state = call.session.state(self.recorder, _Observed)
        current, modulated = sample.detach(), state.modulated
        previous, previous_modulated = state.previous_output, state.previous_modulated
        # A new resolution in the same session starts a new sequence: nothing to compare with.
        if (
            previous is not None
            and previous_modulated is not None
            and modulated is not None
            and previous.shape == current.shape
            and previous_modulated.shape == modulated.shape
        ):
            pair = (_relative_l1(modulated, previous_modulated), _relative_l1(current, previous))
            call.session.shared_state(self.recorder, _pairs).append(pair)
        state.previous_output, state.previous_modulated = current, modulated
        return output


def calibration_pairs(session: CacheSession) -> list[tuple[float, float]]:
    """The (input change, output change) pairs every branch recorded in ``session`` under
    ``calibrate=True``. Read it inside the ``with`` block: the session's state ends with it."""
    for handler in session.plan.handlers.values():
        if isinstance(handler, _ObservedDenoiser):
            return list(session.shared_state(handler.recorder, _pairs))
    raise ValueError(f"session does not run {NAME} with calibrate=True")


def fit_coefficients(pairs: Sequence[tuple[float, float]], degree: int = 4) -> tuple[float, ...]:
    """The least-squares polynomial (highest power first) from input change to output change."""
    if len(pairs) <= degree:
        raise ValueError(
            f"fitting a degree-{degree} polynomial needs more than {degree} pairs, got {len(pairs)}"
        )
    x, y = np.asarray(pairs, dtype=np.float64).T
    return tuple(float(c) for c in np.polyfit(x, y, degree))
