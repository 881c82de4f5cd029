"""MagCache: skip the block stack while the residual's magnitude is predicted to barely change.

The residual the blocks add shrinks or grows from step to step by a ratio that depends on the
checkpoint, not on the prompt: ``mag_ratios`` is that curve, measured once per checkpoint. Past the
retention steps, each step multiplies its ratio into a running product and adds ``|1 - product|`` to
an error; while the error stays within ``threshold`` (and at most ``max_skip_steps`` in a row), the
blocks are replaced by the residual they added at the last full step. Decisions are per branch
(cond, uncond) and per session.

``calibrate=True`` measures the curve instead: nothing is skipped, and at the end of each branch's
``num_inference_steps`` its ratios are logged and kept for :func:`calibrated_ratios`.

Departures from the reference (diffusers' ``hooks/mag_cache.py``):
- a config without ``mag_ratios`` can be built; planning it on a model refuses it (``InvalidConfigValue``
  naming ``mag_ratios``), so that a server can fill in the ratios it holds for that model first;
- on a model with a single block, the step counter also advances on skipped steps (the reference's
  head hook returns before its tail hook runs, so its counter stalls and replays the same ratio).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _validation as check
from ._fields import documented
from .errors import InvalidConfigValue, UnsupportedMethodError, require_block_chain
from .session import CacheSession, Handler, ModuleCall, Plan
from .targets import BlockSite, ModelLayout

NAME = "mag_cache"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MagCacheConfig:
    threshold: float = documented(
        0.06,
        "Budget of the accumulated error (how far the running product of ratios strays from 1): the blocks "
        "are skipped while it stays within this; higher skips more, at some cost in quality.",
    )
    max_skip_steps: int = documented(
        3,
        "At most this many skipped steps in a row (0: never skip).",
    )
    retention_ratio: float = documented(
        0.2,
        "The first round(retention_ratio × num_inference_steps) steps always compute (0..1).",
    )
    num_inference_steps: int = documented(
        28,
        "The run's steps: mag_ratios is resampled to it, and the state restarts after it.",
    )
    # A list, tuple or 1-D tensor, as the reference takes; kept as a tuple of floats.
    mag_ratios: Sequence[float] | torch.Tensor | None = documented(
        None,
        "The checkpoint's magnitude-ratio curve, one ratio per step (a list, tuple or 1-D tensor; kept as "
        "a tuple). None: planning refuses the config unless calibrate is set.",
    )
    calibrate: bool = documented(
        False,
        "Skip nothing and measure the magnitude-ratio curve instead: each branch's is logged once it has "
        "run num_inference_steps steps, and returned by cache_engine.mag_cache.calibrated_ratios.",
    )

    def __post_init__(self) -> None:
        check.number("threshold", self.threshold, minimum=0.0)
        check.non_negative_int("max_skip_steps", self.max_skip_steps)
        check.number("retention_ratio", self.retention_ratio, minimum=0.0)
        if self.retention_ratio > 1:
            raise InvalidConfigValue(
                f"retention_ratio is a fraction of the steps, at most 1, got {self.retention_ratio!r}",
                field="retention_ratio",
            )
        check.positive_int("num_inference_steps", self.num_inference_steps)
        object.__setattr__(self, "mag_ratios", _ratios(self.mag_ratios))
        if not isinstance(self.calibrate, bool):
            raise InvalidConfigValue(
                f"calibrate must be a boolean, got {self.calibrate!r}", field="calibrate"
            )


def _ratios(value: Any) -> tuple[float, ...] | None:
    """``mag_ratios`` as a tuple of floats; a list, a tuple or a 1-D tensor is accepted, as in the reference."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.ndim != 1:
            raise InvalidConfigValue(
                f"mag_ratios must be one-dimensional, got shape {tuple(value.shape)}", field="mag_ratios"
            )
        value = value.tolist()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidConfigValue(f"mag_ratios must be a list of numbers, got {value!r}", field="mag_ratios")
    ratios = tuple(value)
    if not ratios:
        raise InvalidConfigValue("mag_ratios must not be empty", field="mag_ratios")
    for ratio in ratios:
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not math.isfinite(ratio)
            or ratio < 0
        ):
            raise InvalidConfigValue(
                f"mag_ratios must hold finite non-negative numbers, got {ratio!r}", field="mag_ratios"
            )
    return tuple(float(ratio) for ratio in ratios)


def nearest_interp(src_array: torch.Tensor, target_length: int) -> torch.Tensor:
    """The reference's resampling of a ratio curve to ``target_length`` steps (nearest neighbour)."""
    src_length = len(src_array)
    if target_length == 1:
        return src_array[-1:]
    scale = (src_length - 1) / (target_length - 1)
    grid = torch.arange(target_length, device=src_array.device, dtype=torch.float32)
    mapped_indices = torch.round(grid * scale).long()
    return src_array[mapped_indices]


class _Schedule:
    """What every block of one plan shares: the config and the ratio curve resampled to the steps."""

    def __init__(self, config: MagCacheConfig) -> None:
        self.config = config
        self.ratios: torch.Tensor | None = None
        if config.mag_ratios is not None and not config.calibrate:
            # float32, as the reference's torch.tensor(list): the error it accumulates is compared
            # with the threshold in that precision, and a decision near it must come out the same.
            ratios = torch.tensor(config.mag_ratios)
            if len(ratios) != config.num_inference_steps:
                ratios = nearest_interp(ratios, config.num_inference_steps)
            self.ratios = ratios
        self.retention_step = int(config.retention_ratio * config.num_inference_steps + 0.5)


class _State:
    """One branch's MagCache state, shared by every block of the plan."""

    __slots__ = (
        "accumulated_err",
        "accumulated_ratio",
        "accumulated_steps",
        "calibration_ratios",
        "chain_inputs",
        "previous_residual",
        "residuals",
        "should_compute",
        "step_index",
    )

    def __init__(self) -> None:
        self.should_compute = True
        # Per run of blocks with one stream layout (ModelLayout.stream_chains): the image stream it
        # started from on this call, and what it added on the last call that computed.
        self.chain_inputs: dict[int, torch.Tensor] = {}
        self.restart()

    def restart(self) -> None:
        self.residuals: dict[int, torch.Tensor] = {}
        # The last run's residual: the one the magnitude ratios are measured on.
        self.previous_residual: torch.Tensor | None = None
        # Become float32 tensors on the first multiplication by a ratio, as in the reference.
        self.accumulated_ratio: float | torch.Tensor = 1.0
        self.accumulated_err: float | torch.Tensor = 0.0
        self.accumulated_steps = 0
        self.step_index = 0
        self.calibration_ratios: list[float] = []


@dataclass(frozen=True)
class _Role:
    chain: int
    first: bool  # the first block of its run; of run 0, the head that decides
    last: bool  # the last block of its run: records what the run added
    tail: bool  # the last block of all: a step ends with it


class _BlockHandler:
    """One block's part: the head decides; each run's first block replays the run's residual on a
    skipped step, and its last block records that residual after a computed one."""

    def __init__(self, site: BlockSite, schedule: _Schedule, role: _Role) -> None:
        self.site = site
        self.schedule = schedule
        self.role = role

    def __call__(self, call: ModuleCall) -> Any:
        state = call.session.state(self.schedule, _State)
        site, role = self.site, self.role
        if role.chain == 0 and role.first:
            state.should_compute = self._should_compute(state)
        if not state.should_compute:
            hidden, encoder = site.inputs(call.args, call.kwargs)
            if role.first:
                hidden = _add_residual(hidden, state.residuals[role.chain])
            if role.tail:
                self._advance(call.session, state)
            # The text stream passes through unchanged, as in the reference.
            return site.pack(hidden, encoder)
        if role.first:
            state.chain_inputs[role.chain] = site.hidden_input(call.args, call.kwargs)
        output = call.run()
        if role.last:
            hidden_out = site.streams(output)[0]
            state.residuals[role.chain] = hidden_out - state.chain_inputs.pop(role.chain)
        if role.tail:
            self._record(call.session, state)
        return output

    def _should_compute(self, state: _State) -> bool:
        schedule = self.schedule
        config = schedule.config
        if config.calibrate:
            return True
        assert schedule.ratios is not None
        step = state.step_index
        current_scale: float | torch.Tensor = schedule.ratios[step] if step < len(schedule.ratios) else 1.0
        if step < schedule.retention_step:
            return True
        state.accumulated_ratio = state.accumulated_ratio * current_scale
        state.accumulated_steps += 1
        deviation = 1.0 - state.accumulated_ratio
        state.accumulated_err = state.accumulated_err + (
            deviation.abs() if isinstance(deviation, torch.Tensor) else abs(deviation)
        )
        if (
            state.previous_residual is not None
            and bool(state.accumulated_err <= config.threshold)
            and state.accumulated_steps <= config.max_skip_steps
        ):
            return False
        state.accumulated_ratio = 1.0
        state.accumulated_steps = 0
        state.accumulated_err = 0.0
        return True

    def _record(self, session: CacheSession, state: _State) -> None:
        residual = state.residuals[self.role.chain]
        if self.schedule.config.calibrate:
            state.calibration_ratios.append(_magnitude_ratio(residual, state.previous_residual))
        state.previous_residual = residual
        self._advance(session, state)

    def _advance(self, session: CacheSession, state: _State) -> None:
        state.step_index += 1
        if state.step_index < self.schedule.config.num_inference_steps:
            return
        # The end of a run of num_inference_steps: keep what a calibration measured, start afresh.
        if self.schedule.config.calibrate:
            ratios = tuple(state.calibration_ratios)
            session.shared_state(self.schedule, _calibrations)[session.branch] = ratios
            logger.info("MagCache calibration (branch %s): mag_ratios=%s", session.branch, list(ratios))
        state.restart()


def _calibrations() -> dict[str, tuple[float, ...]]:
    return {}


def _magnitude_ratio(current: torch.Tensor, previous: torch.Tensor | None) -> float:
    """The calibration formula: mean over tokens of |current| / |previous| (1.0 at the first step)."""
    if previous is None:
        return 1.0
    current_norm = torch.linalg.norm(current.float(), dim=-1)
    previous_norm = torch.linalg.norm(previous.float(), dim=-1)
    return float((current_norm / (previous_norm + 1e-8)).mean().item())


def _add_residual(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``hidden`` plus the cached residual, which may cover only the trailing (image) tokens."""
    assert residual is not None
    if residual.device != hidden.device:
        residual = residual.to(hidden.device)
    if residual.shape == hidden.shape:
        return hidden + residual
    if (
        hidden.ndim == 3
        and residual.ndim == 3
        and hidden.shape[0] == residual.shape[0]
        and hidden.shape[2] == residual.shape[2]
        and hidden.shape[1] > residual.shape[1]
    ):
        output = hidden.clone()
        diff = hidden.shape[1] - residual.shape[1]
        output[:, diff:, :] = output[:, diff:, :] + residual
        return output
    logger.warning(
        "MagCache: input %s and cached residual %s do not match; returning the input without residual",
        tuple(hidden.shape),
        tuple(residual.shape),
    )
    return hidden


def calibrated_ratios(session: CacheSession) -> dict[str, tuple[float, ...]]:
    """The ``mag_ratios`` each branch measured in ``session`` under ``calibrate=True``, by branch name.

    A branch appears once it has run ``num_inference_steps`` steps. Read it inside the ``with`` block:
    the session's state is dropped when it ends.
    """
    for handler in session.plan.handlers.values():
        if isinstance(handler, _BlockHandler):
            return dict(session.shared_state(handler.schedule, _calibrations))
    raise ValueError(f"session runs {session.plan.method}, not {NAME}")


def plan(config: MagCacheConfig, layout: ModelLayout) -> Plan:
    blocks = layout.blocks
    if not blocks:
        raise UnsupportedMethodError(NAME, layout, "found no transformer blocks")
    require_block_chain(NAME, layout)
    if config.mag_ratios is None and not config.calibrate:
        raise InvalidConfigValue(
            "mag_ratios must be given: MagCache's magnitude ratios are measured per checkpoint "
            "(run once with calibrate=True to obtain them)",
            field="mag_ratios",
        )
    schedule = _Schedule(config)
    handlers: dict[nn.Module, Handler] = {}
    chains = layout.stream_chains
    for chain_index, chain in enumerate(chains):
        for index, site in enumerate(chain):
            role = _Role(
                chain=chain_index,
                first=index == 0,
                last=index == len(chain) - 1,
                tail=chain_index == len(chains) - 1 and index == len(chain) - 1,
            )
            handlers[site.module] = _BlockHandler(site, schedule, role)
    return Plan(method=NAME, handlers=handlers)
