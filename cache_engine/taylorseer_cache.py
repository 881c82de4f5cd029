"""TaylorSeer: between full computations, predict module outputs from a Taylor series in the step.

Modules in "cache" mode store finite-difference factors at each full computation and extrapolate on
the steps in between; modules in "skip" mode return zeros of the recorded shape instead (their
output is overwritten downstream by a cached module, as in lite mode: blocks skipped, ``proj_out``
cached).

Departure from the reference: its default patterns (``^transformer_blocks.*attn`` and friends,
matched with ``re.fullmatch``) match no module of families that name attention ``attn1``/``attn2``
(CogVideoX, Wan, LTX, ...), so it silently does nothing there. With no identifiers given and no
match, this implementation caches every attention module of the transformer's blocks instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _validation as check
from ._fields import documented
from .errors import InvalidConfigValue, UnsupportedMethodError
from .session import CacheSession, Handler, ModuleCall, Plan, decide_and_record
from .targets import ModelLayout

NAME = "taylorseer"

_ATTENTION_PATTERNS = (
    "^blocks.*attn",
    "^transformer_blocks.*attn",
    "^single_transformer_blocks.*attn",
    "^temporal_transformer_blocks.*attn",
)
_LITE_SKIP_PATTERNS = ("^[^.]*block[^.]*\\.[^.]+$",)


def lite_skipped(name: str, layout: ModelLayout) -> bool:
    """Whether lite mode skips the module ``name``: the reference's pattern (every child of a list named
    for blocks), and the blocks of the model table where their lists are named otherwise (``layers``)."""
    return any(re.fullmatch(pattern, name) for pattern in _LITE_SKIP_PATTERNS) or name in layout.block_names


@dataclass(frozen=True)
class TaylorSeerCacheConfig:
    cache_interval: int = documented(
        5,
        "Once caching begins, the modules compute in full every N-th step and their outputs are predicted "
        "on the N - 1 steps between.",
    )
    disable_cache_before_step: int = documented(
        3,
        "Steps 0 to N - 1 always compute in full, gathering the Taylor factors; prediction begins at step N.",
    )
    disable_cache_after_step: int | None = documented(
        None,
        "From this step index on, every step computes in full. None: caching runs to the last step.",
    )
    max_order: int = documented(
        1,
        "Highest order of the Taylor expansion that predicts a module's output (0: reuse the last output); "
        "higher orders approximate better but keep more tensors.",
    )
    taylor_factors_dtype: torch.dtype | None = documented(
        torch.bfloat16,
        "Dtype in which the Taylor factors are stored: lower precision saves memory, higher is more "
        "accurate. None: the module output's own dtype.",
    )
    skip_predict_identifiers: tuple[str, ...] | None = documented(
        None,
        "Regular expressions matched (re.fullmatch) against module names: a matching module computes on "
        "full steps and returns zeros of its recorded shape on predicted steps. None: no such module.",
    )
    cache_identifiers: tuple[str, ...] | None = documented(
        None,
        "Regular expressions matched (re.fullmatch) against module names: a matching module's output is "
        "predicted by its Taylor series on predicted steps. None: the transformer blocks' attention modules.",
    )
    use_lite_mode: bool = documented(
        False,
        "Save memory with fixed patterns in place of skip_predict_identifiers and cache_identifiers: the "
        "transformer blocks return zeros on predicted steps and only proj_out is predicted.",
    )

    def __post_init__(self) -> None:
        check.positive_int("cache_interval", self.cache_interval)
        check.non_negative_int("disable_cache_before_step", self.disable_cache_before_step)
        check.non_negative_int("disable_cache_after_step", self.disable_cache_after_step, optional=True)
        check.non_negative_int("max_order", self.max_order)
        check.optional_dtype("taylor_factors_dtype", self.taylor_factors_dtype)
        for field in ("skip_predict_identifiers", "cache_identifiers"):
            object.__setattr__(self, field, check.patterns(field, getattr(self, field), optional=True))
        if not isinstance(self.use_lite_mode, bool):
            raise InvalidConfigValue(
                f"use_lite_mode must be a boolean, got {self.use_lite_mode!r}", field="use_lite_mode"
            )


class _State:
    __slots__ = (
        "current_step",
        "device",
        "factors",
        "inactive_shapes",
        "is_inactive",
        "last_update_step",
        "max_order",
        "module_dtypes",
        "taylor_factors_dtype",
    )

    def __init__(self, taylor_factors_dtype: torch.dtype | None, max_order: int, is_inactive: bool) -> None:
        self.taylor_factors_dtype = taylor_factors_dtype
        self.max_order = max_order
        self.is_inactive = is_inactive
        self.module_dtypes: tuple[torch.dtype | None, ...] = ()
        self.last_update_step: int | None = None
        self.factors: dict[int, dict[int, torch.Tensor]] = {}
        self.inactive_shapes: tuple[torch.Size | None, ...] | None = None
        self.device: torch.device | None = None
        self.current_step = -1

    def update(self, outputs: tuple[torch.Tensor | None, ...]) -> None:
        # Some modules return None in a slot (SD3's last block has no text stream): keep the slot empty.
        self.module_dtypes = tuple(None if output is None else output.dtype for output in outputs)
        self.device = next(output.device for output in outputs if output is not None)
        if self.is_inactive:
            self.inactive_shapes = tuple(None if output is None else output.shape for output in outputs)
        else:
            for index, features in enumerate(outputs):
                if features is None:
                    self.factors.pop(index, None)
                    continue
                new: dict[int, torch.Tensor] = {0: features}
                if self.last_update_step is not None:
                    delta = self.current_step - self.last_update_step
                    previous = self.factors.get(index, {})
                    for order in range(self.max_order):
                        prior = previous.get(order)
                        if prior is None or prior.shape != new[order].shape:
                            break
                        new[order + 1] = (new[order] - prior.to(features.dtype)) / delta
                self.factors[index] = {
                    order: factor.to(self.taylor_factors_dtype) for order, factor in new.items()
                }
        self.last_update_step = self.current_step

    def predict(self) -> list[torch.Tensor | None]:
        assert self.last_update_step is not None
        offset = self.current_step - self.last_update_step
        outputs: list[torch.Tensor | None] = []
        if self.is_inactive:
            assert self.inactive_shapes is not None
            for shape, dtype in zip(self.inactive_shapes, self.module_dtypes, strict=True):
                if shape is None or dtype is None:
                    outputs.append(None)
                else:
                    outputs.append(torch.zeros(shape, dtype=dtype, device=self.device))
            return outputs
        for index, dtype in enumerate(self.module_dtypes):
            factors = self.factors.get(index)
            if factors is None or dtype is None:
                outputs.append(None)
                continue
            output = torch.zeros_like(factors[0], dtype=dtype)
            for order in range(len(factors)):
                output = output + factors[order].to(dtype) * ((offset**order) / math.factorial(order))
            outputs.append(output)
        return outputs


class _TaylorSeerHandler:
    def __init__(self, config: TaylorSeerCacheConfig, is_inactive: bool) -> None:
        self.config = config
        self.is_inactive = is_inactive

    def _new_state(self) -> _State:
        return _State(self.config.taylor_factors_dtype, self.config.max_order, self.is_inactive)

    def decide(self, session: CacheSession, module: nn.Module) -> Any:
        config = self.config
        state = session.state(self, self._new_state)
        state.current_step += 1
        step = state.current_step
        should_compute = (
            # Nothing recorded yet to predict from (disable_cache_before_step=0 with an interval above
            # one): compute. The reference raises here; for every config it accepts, this changes nothing.
            state.last_update_step is None
            or step < config.disable_cache_before_step
            or (step - config.disable_cache_before_step - 1) % config.cache_interval == 0
            or (config.disable_cache_after_step is not None and step >= config.disable_cache_after_step)
        )
        if should_compute:
            return None
        predicted = state.predict()
        return predicted[0] if len(predicted) == 1 else tuple(predicted)

    def record(self, session: CacheSession, module: nn.Module, output: Any, computed: bool) -> None:
        if computed:
            state = session.state(self, self._new_state)
            state.update((output,) if isinstance(output, torch.Tensor) else tuple(output))

    def __call__(self, call: ModuleCall) -> Any:
        return decide_and_record(self, call)


def _resolve_patterns(
    config: TaylorSeerCacheConfig, layout: ModelLayout
) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(skip patterns, cache patterns, whether the cache patterns are the defaults)."""
    if config.use_lite_mode:
        # The reference predicts proj_out; a denoiser whose output head has another name predicts that.
        head = layout.output_head
        return _LITE_SKIP_PATTERNS, () if head is None else (f"^{re.escape(head)}$",), False
    skip = config.skip_predict_identifiers or ()
    cache = config.cache_identifiers or ()
    return skip, cache or _ATTENTION_PATTERNS, not cache


def plan(config: TaylorSeerCacheConfig, layout: ModelLayout) -> Plan:
    skip_patterns, cache_patterns, default_cache = _resolve_patterns(config, layout)
    handlers: dict[nn.Module, Handler] = {}
    cached = 0
    for name, module in layout.modules.items():
        is_skip = (
            lite_skipped(name, layout)
            if config.use_lite_mode
            else any(re.fullmatch(pattern, name) for pattern in skip_patterns)
        )
        is_cache = any(re.fullmatch(pattern, name) for pattern in cache_patterns)
        if is_skip or is_cache:
            handlers[module] = _TaylorSeerHandler(config, is_inactive=is_skip)
            cached += not is_skip
    if default_cache and not cached:
        block_prefixes = tuple(f"{site.name}." for site in layout.blocks)
        for site in layout.attention:
            if site.name.startswith(block_prefixes):
                handlers.setdefault(site.module, _TaylorSeerHandler(config, is_inactive=False))
    if not handlers:
        raise UnsupportedMethodError(NAME, layout, "no module matches the configured identifiers")
    if config.use_lite_mode:
        # Lite mode skips the blocks outright: without the output projection predicted in their place,
        # or with another head reading them, the output would be built from nothing.
        if not cached:
            raise UnsupportedMethodError(NAME, layout, "lite mode found no output projection to predict")
        if layout.family.other_output_heads:
            raise UnsupportedMethodError(
                NAME,
                layout,
                f"lite mode predicts the output projection alone, and {layout.family.other_output_heads[0]} "
                "also reads the blocks' output",
            )
    return Plan(method=NAME, handlers=handlers)
