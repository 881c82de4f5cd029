"""DBCache (cache-dit's Dual Block Cache): the first blocks decide, the middle is reused, the last refine.

Per denoiser call and branch, the first ``Fn_compute_blocks`` blocks always run; the relative mean
absolute change of the residual they add (against the last call that ran everything) decides whether
the middle blocks run or are replaced by the residual they added last time (or, with TaylorSeer, by
its extrapolation); the last ``Bn_compute_blocks`` always run, on whichever hidden states came out.
Warmup, step limits and a static compute mask bound the reuse, with cache-dit's rules and names.

The decision state mirrors cache-dit 1.5.3's ``CachedContext`` (one per block chain), so a config
gives the same decisions and outputs. Departures: state is keyed by the pipeline's CFG branch
(``cond`` / ``uncond``) instead of by the parity of the call count, so it holds whether or not the
pipeline runs CFG; a step left to the cache before anything was cached computes (cache-dit fails).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from . import _validation as check
from ._fields import documented
from .errors import InvalidConfigValue, UnsupportedMethodError, require_block_chain
from .session import Handler, ModuleCall, Plan
from .targets import BlockSite, ModelLayout

NAME = "dbcache"

StepsComputationPolicy = Literal["dynamic", "static"]


@dataclass(frozen=True)
class DBCacheConfig:
    """cache-dit's ``DBCacheConfig`` fields (same names and defaults), plus its TaylorSeer calibrator."""

    Fn_compute_blocks: int = documented(
        8,
        "Number of blocks at the front of a chain, always run; their residual decides.",
    )
    Bn_compute_blocks: int = documented(
        0,
        "Number of blocks at the back of a chain, always run, on whatever the middle gave.",
    )
    residual_diff_threshold: float = documented(
        0.08,
        "Reuse the middle while the front residual's relative mean absolute change (against the last call "
        "that ran the middle) is below this; 0 never reuses, 1 or more always does, without measuring.",
    )
    max_accumulated_residual_diff_threshold: float | None = documented(
        None,
        "Stop reusing once the measured changes add up to this (None or 0: no limit).",
    )
    max_warmup_steps: int = documented(
        8,
        "Number of initial steps that always compute (the warmup; see warmup_interval).",
    )
    warmup_interval: int = documented(
        1,
        "Within the warmup, only every n-th step must compute.",
    )
    max_cached_steps: int = documented(
        -1,
        "At most this many reused steps per run (-1: no limit).",
    )
    max_continuous_cached_steps: int = documented(
        -1,
        "At most this many reused steps in a row (-1: no limit).",
    )
    steps_computation_mask: tuple[int, ...] | None = documented(
        None,
        "One 0 or 1 per step: 1 always computes; its leading 1s cap the warmup. None: no mask.",
    )
    steps_computation_policy: StepsComputationPolicy = documented(
        "dynamic",
        "On a 0 of the mask, or a step past its end: dynamic measures as usual, static reuses without "
        "measuring.",
    )
    enable_taylorseer: bool = documented(
        False,
        "Predict the middle's residual with cache-dit's TaylorSeer calibrator instead of reusing the last "
        "one (both streams).",
    )
    taylorseer_order: int = documented(
        1,
        "The calibrator's order, 1 or 2 (with enable_taylorseer).",
    )

    def __post_init__(self) -> None:
        check.positive_int("Fn_compute_blocks", self.Fn_compute_blocks)
        check.non_negative_int("Bn_compute_blocks", self.Bn_compute_blocks)
        check.number("residual_diff_threshold", self.residual_diff_threshold, minimum=0.0)
        if self.max_accumulated_residual_diff_threshold is not None:
            check.number(
                "max_accumulated_residual_diff_threshold",
                self.max_accumulated_residual_diff_threshold,
                minimum=0.0,
            )
        check.non_negative_int("max_warmup_steps", self.max_warmup_steps)
        check.positive_int("warmup_interval", self.warmup_interval)
        for name in ("max_cached_steps", "max_continuous_cached_steps"):
            _limit(name, getattr(self, name))
        object.__setattr__(self, "steps_computation_mask", _mask(self.steps_computation_mask))
        if self.steps_computation_policy not in ("dynamic", "static"):
            raise InvalidConfigValue(
                f"steps_computation_policy must be 'dynamic' or 'static', got {self.steps_computation_policy!r}",
                field="steps_computation_policy",
            )
        if not isinstance(self.enable_taylorseer, bool):
            raise InvalidConfigValue(
                f"enable_taylorseer must be a boolean, got {self.enable_taylorseer!r}",
                field="enable_taylorseer",
            )
        order = self.taylorseer_order
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2):
            raise InvalidConfigValue(
                f"taylorseer_order must be 1 or 2, got {self.taylorseer_order!r}", field="taylorseer_order"
            )

    @property
    def warmup_steps(self) -> range:
        """The steps that always compute: a leading run of 1s in the mask caps the warmup (cache-dit's rule)."""
        warmup = self.max_warmup_steps
        if self.steps_computation_mask is not None:
            leading = next(
                (i for i, m in enumerate(self.steps_computation_mask) if m != 1),
                len(self.steps_computation_mask),
            )
            warmup = min(warmup, leading)
        return range(0, warmup, self.warmup_interval)


def _limit(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise InvalidConfigValue(f"{name} must be an integer >= -1 (-1: no limit), got {value!r}", field=name)


def _mask(value: Any) -> tuple[int, ...] | None:
    name = "steps_computation_mask"
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidConfigValue(f"{name} must be a list of 0s and 1s, got {value!r}", field=name)
    mask = tuple(value)
    if not mask or any(isinstance(m, bool) or not isinstance(m, int) or m not in (0, 1) for m in mask):
        raise InvalidConfigValue(f"{name} must be a non-empty list of 0s and 1s, got {value!r}", field=name)
    return mask


# -- TaylorSeer: cache-dit's calibrator ------------------------------------------------------------


class _TaylorSeries:
    """One stream's Taylor expansion, stepped as cache-dit's ``TaylorSeerState`` is.

    Created at the stream's first update, so its step runs one behind the chain's (its first
    derivative appears at the third update); kept that way because the outputs depend on it.
    """

    __slots__ = ("current", "current_step", "last_update_step", "order")

    def __init__(self, order: int) -> None:
        self.order = order
        self.current: list[torch.Tensor | None] = [None] * (order + 1)
        self.current_step = -1
        self.last_update_step = -1

    def mark_step_begin(self) -> None:
        self.current_step += 1

    def update(self, value: torch.Tensor) -> None:
        previous = self.current
        window = self.current_step - self.last_update_step
        if previous[0] is not None and previous[0].shape != value.shape:
            # A new shape (another resolution in the same session) starts a new series.
            previous = [None] * (self.order + 1)
            self.current_step = self.last_update_step = -1
        factors: list[torch.Tensor | None] = [value] + [None] * self.order
        for i in range(self.order):
            prior = previous[i]
            if prior is None or self.current_step <= 1:
                break
            factors[i + 1] = (factors[i] - prior) / window  # type: ignore[operator]
        self.current = factors
        self.last_update_step = self.current_step

    def approximate(self) -> torch.Tensor:
        elapsed = self.current_step - self.last_update_step
        output: Any = 0
        for i, factor in enumerate(self.current):
            if factor is None:
                break
            # cache-dit's expression and order of operations, so the rounding is the same.
            output += (1 / math.factorial(i)) * factor * (elapsed**i)
        result: torch.Tensor = output
        return result


# -- one chain's decisions, per branch -------------------------------------------------------------


class _ChainState:
    """cache-dit's ``CachedContext`` for one chain of blocks, and the tensors of the call in progress."""

    __slots__ = (
        "accumulated_residual_diff",
        "cached_steps",
        "chain_input",
        "continuous_cached_steps",
        "encoder_residual",
        "encoder_series",
        "front_residual",
        "hidden_residual",
        "hidden_series",
        "middle_input",
        "residual_diffs",
        "reusing",
        "step",
    )

    def __init__(self) -> None:
        self.step = -1
        self.cached_steps: list[int] = []
        self.continuous_cached_steps = 0
        self.residual_diffs: dict[int, float] = {}
        self.accumulated_residual_diff = 0.0
        # The front blocks' residual at the last call that ran the middle: what the next calls compare to.
        self.front_residual: torch.Tensor | None = None
        # The middle blocks' residuals at that call (without TaylorSeer).
        self.hidden_residual: torch.Tensor | None = None
        self.encoder_residual: torch.Tensor | None = None
        self.hidden_series: _TaylorSeries | None = None
        self.encoder_series: _TaylorSeries | None = None
        # The call in progress.
        self.chain_input: torch.Tensor | None = None
        self.middle_input: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.reusing = False

    def mark_step_begin(self) -> None:
        self.step += 1
        # A computed step ends the streak of cached ones.
        if not self.cached_steps or self.cached_steps[-1] != self.step - 1:
            self.continuous_cached_steps = 0
        for series in (self.hidden_series, self.encoder_series):
            if series is not None:
                series.mark_step_begin()

    def can_cache(self, config: DBCacheConfig, front_residual: torch.Tensor) -> bool:
        step = self.step
        if step in config.warmup_steps:
            return False
        mask = config.steps_computation_mask
        if mask is not None:
            if step < len(mask) and mask[step] == 1:
                return False
            if config.steps_computation_policy == "static":
                return True
        if 0 <= config.max_cached_steps <= len(self.cached_steps):
            return False
        continuous = self.continuous_cached_steps
        if self.cached_steps and self.cached_steps[-1] == step:
            continuous -= 1
        if 0 <= config.max_continuous_cached_steps <= continuous:
            return False
        limit = config.max_accumulated_residual_diff_threshold
        if limit is not None and 0.0 < limit <= self.accumulated_residual_diff:
            return False
        threshold = config.residual_diff_threshold
        if threshold <= 0.0 or self.front_residual is None:
            return False
        return self._similar(self.front_residual, front_residual, threshold)

    def _similar(self, previous: torch.Tensor, current: torch.Tensor, threshold: float) -> bool:
        if threshold >= 1.0:
            # cache-dit treats a threshold of 1 or more as "always similar", without measuring.
            self._record_diff(-1.0)
            return True
        if previous.shape != current.shape:
            self._record_diff(-2.0)
            return False
        diff = ((previous - current).abs().mean() / previous.abs().mean()).item()
        self._record_diff(diff)
        return diff < threshold

    def _record_diff(self, diff: float) -> None:
        if self.step not in self.residual_diffs:
            self.residual_diffs[self.step] = diff
            if diff > 0.0:
                self.accumulated_residual_diff += diff

    def add_cached_step(self) -> None:
        self.continuous_cached_steps += 1
        self.cached_steps.append(self.step)

    def has_residual(self) -> bool:
        series = self.hidden_series
        return self.hidden_residual is not None if series is None else series.current[0] is not None

    def store_residuals(self, hidden: torch.Tensor, encoder: torch.Tensor | None, order: int | None) -> None:
        if order is None:
            self.hidden_residual = hidden
            if encoder is not None:
                self.encoder_residual = encoder
            return
        self.hidden_series = _update(self.hidden_series, hidden, order)
        if encoder is not None:
            self.encoder_series = _update(self.encoder_series, encoder, order)

    def residuals(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.hidden_series is None and self.encoder_series is None:
            return self.hidden_residual, self.encoder_residual
        return (
            None if self.hidden_series is None else self.hidden_series.approximate(),
            None if self.encoder_series is None else self.encoder_series.approximate(),
        )


def _update(series: _TaylorSeries | None, value: torch.Tensor, order: int) -> _TaylorSeries:
    if series is None:
        series = _TaylorSeries(order)
    series.update(value)
    return series


# -- the blocks' handlers --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Role:
    first: bool  # records the chain's input
    decides: bool  # the last front block: decides after it ran
    middle: bool  # reused on a cached call
    last_middle: bool  # records the middle's residual after it ran
    middle_empty: bool  # Fn + Bn cover the chain: the decider records an empty residual


class _ChainBlockHandler:
    def __init__(self, site: BlockSite, role: _Role, config: DBCacheConfig, key: object) -> None:
        self.site = site
        self.role = role
        self.config = config
        self.key = key
        self.order = config.taylorseer_order if config.enable_taylorseer else None

    def __call__(self, call: ModuleCall) -> Any:
        state = call.session.state(self.key, _ChainState)
        site, role = self.site, self.role
        if role.middle:
            if state.reusing:
                return site.pack(*site.inputs(call.args, call.kwargs))
            output = call.run()
            if role.last_middle:
                self._store_middle_residuals(state, output)
            return output
        if role.first:
            state.chain_input = site.hidden_input(call.args, call.kwargs)
        output = call.run()
        if role.decides:
            return self._decide(state, output)
        return output

    def _decide(self, state: _ChainState, output: Any) -> Any:
        site, config = self.site, self.config
        hidden, encoder = site.streams(output)
        assert state.chain_input is not None
        front_residual = hidden - state.chain_input
        state.chain_input = None
        state.mark_step_begin()
        state.reusing = state.can_cache(config, front_residual) and state.has_residual()
        if state.reusing:
            state.add_cached_step()
            hidden_residual, encoder_residual = state.residuals()
            assert hidden_residual is not None
            hidden = (hidden_residual + hidden).contiguous()
            if encoder is not None and encoder_residual is not None:
                encoder = (encoder_residual + encoder).contiguous()
            return site.pack(hidden, encoder)
        state.front_residual = front_residual
        state.middle_input = (hidden, encoder)
        if self.role.middle_empty:
            self._store_middle_residuals(state, output)
        return output

    def _store_middle_residuals(self, state: _ChainState, output: Any) -> None:
        assert state.middle_input is not None
        hidden_in, encoder_in = state.middle_input
        state.middle_input = None
        hidden, encoder = self.site.streams(output)
        # SD3's last block returns no text stream: there is no text residual to keep then.
        encoder_residual = None if encoder is None or encoder_in is None else encoder - encoder_in
        state.store_residuals(hidden - hidden_in, encoder_residual, self.order)


# -- the plan --------------------------------------------------------------------------------------


def chains(layout: ModelLayout) -> tuple[tuple[BlockSite, ...], ...]:
    """The runs of blocks cached as one, each with decisions of its own: cache-dit's grouping."""
    family = layout.family
    if family.block_lists_cached_apart:
        return layout.block_lists
    return layout.stream_chains


def fitted_defaults(layout: ModelLayout) -> dict[str, Any]:
    """The fields whose reference default cannot act on ``layout``, with values that can.

    cache-dit's F8B0 suits FLUX's 19 and 38 blocks; on a chain of eight or fewer, eight front blocks
    leave nothing between them to cache (or do not fit). There DBCache runs as cache-dit's F1B0: one
    front block decides, every other block may be reused.
    """
    default = DBCacheConfig()
    runs = [run for run in chains(layout) if run]
    if not runs or default.Fn_compute_blocks + default.Bn_compute_blocks < min(len(run) for run in runs):
        return {}
    return {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0}


def plan(config: DBCacheConfig, layout: ModelLayout) -> Plan:
    runs = chains(layout)
    if not any(len(run) >= 2 for run in runs):
        raise UnsupportedMethodError(NAME, layout, "needs a list of at least two transformer blocks")
    require_block_chain(NAME, layout)
    front, back = config.Fn_compute_blocks, config.Bn_compute_blocks
    shortest = min(len(run) for run in runs)
    if front > shortest:
        raise InvalidConfigValue(
            f"Fn_compute_blocks={front} exceeds the {shortest} blocks this model caches as one chain",
            field="Fn_compute_blocks",
        )
    if front + back > shortest:
        raise InvalidConfigValue(
            f"Fn_compute_blocks + Bn_compute_blocks = {front + back} exceeds the {shortest} blocks this "
            "model caches as one chain",
            field="Bn_compute_blocks",
        )
    handlers: dict[nn.Module, Handler] = {}
    for run in runs:
        key = object()
        middle_end = len(run) - back
        for index, site in enumerate(run[:middle_end]):
            role = _Role(
                first=index == 0,
                decides=index == front - 1,
                middle=index >= front,
                last_middle=index == middle_end - 1 and index >= front,
                middle_empty=middle_end == front,
            )
            handlers[site.module] = _ChainBlockHandler(site, role, config, key)
    return Plan(method=NAME, handlers=handlers)
