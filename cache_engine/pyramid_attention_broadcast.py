"""Pyramid Attention Broadcast: reuse an attention module's output for a few calls in a timestep range.

Departure from the reference: its state is kept per branch. The reference keeps one state per
attention module, so when a pipeline makes the cond and uncond passes as separate calls, the uncond
pass is served the cond pass's attention output. Here each pass reuses only its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import _validation as check
from ._fields import documented
from .errors import UnsupportedMethodError
from .session import CacheSession, Handler, ModuleCall, Plan, decide_and_record
from .targets import AttentionSite, ModelLayout

NAME = "pyramid_attention_broadcast"
logger = logging.getLogger(__name__)

_DEFAULT_SKIP_RANGE = 2


@dataclass(frozen=True)
class PyramidAttentionBroadcastConfig:
    spatial_attention_block_skip_range: int | None = documented(
        None,
        "Compute each spatial self-attention module every N-th call and reuse its last output for the "
        "N - 1 calls between, within spatial_attention_timestep_skip_range. None: spatial attention is not "
        "cached, unless all three skip ranges are None, in which case 2 is used.",
    )
    temporal_attention_block_skip_range: int | None = documented(
        None,
        "Compute each temporal self-attention module every N-th call and reuse its last output for the "
        "N - 1 calls between, within temporal_attention_timestep_skip_range. None: temporal attention is not "
        "cached.",
    )
    cross_attention_block_skip_range: int | None = documented(
        None,
        "Compute each cross-attention module every N-th call and reuse its last output for the N - 1 calls "
        "between, within cross_attention_timestep_skip_range. None: cross-attention is not cached.",
    )
    spatial_attention_timestep_skip_range: tuple[float, float] = documented(
        (100, 800),
        "(low, high) timesteps on the 0..1000 scale: spatial attention may be reused only while "
        "low < timestep < high.",
    )
    temporal_attention_timestep_skip_range: tuple[float, float] = documented(
        (100, 800),
        "(low, high) timesteps on the 0..1000 scale: temporal attention may be reused only while "
        "low < timestep < high.",
    )
    cross_attention_timestep_skip_range: tuple[float, float] = documented(
        (100, 800),
        "(low, high) timesteps on the 0..1000 scale: cross-attention may be reused only while "
        "low < timestep < high.",
    )
    spatial_attention_block_identifiers: tuple[str, ...] = documented(
        (
            "blocks",
            "transformer_blocks",
            "single_transformer_blocks",
            "layers",
            "visual_transformer_blocks",
        ),
        "Regular expressions searched (re.search) in attention module names: a self-attention module "
        "matching one is cached as spatial attention.",
    )
    temporal_attention_block_identifiers: tuple[str, ...] = documented(
        ("temporal_transformer_blocks",),
        "Regular expressions searched (re.search) in attention module names: a self-attention module "
        "matching one is cached as temporal attention (spatial identifiers take precedence).",
    )
    cross_attention_block_identifiers: tuple[str, ...] = documented(
        ("blocks", "transformer_blocks", "layers"),
        "Regular expressions searched (re.search) in attention module names: a cross-attention module "
        "matching one is cached as cross-attention.",
    )
    # The reference requires it; here it is optional.
    current_timestep_callback: Callable[[], Any] | None = documented(
        None,
        "Returns the current denoising timestep on the 0..1000 scale. None: the timestep is read from the "
        "denoiser's timestep argument, mapped to that scale by the model's family table.",
    )

    def __post_init__(self) -> None:
        for kind in ("spatial", "temporal", "cross"):
            check.positive_int(
                f"{kind}_attention_block_skip_range",
                getattr(self, f"{kind}_attention_block_skip_range"),
                optional=True,
            )
            field = f"{kind}_attention_timestep_skip_range"
            object.__setattr__(self, field, check.timestep_range(field, getattr(self, field)))
            field = f"{kind}_attention_block_identifiers"
            object.__setattr__(self, field, check.patterns(field, getattr(self, field)))
        check.callback("current_timestep_callback", self.current_timestep_callback)


class _State:
    __slots__ = ("cache", "iteration")

    def __init__(self) -> None:
        self.iteration = 0
        self.cache: Any = None


class _BroadcastHandler:
    def __init__(
        self,
        block_skip_range: int,
        timestep_skip_range: tuple[float, float],
        timestep: Callable[[CacheSession], Any],
    ):
        self.block_skip_range = block_skip_range
        self.low, self.high = timestep_skip_range
        self.timestep = timestep

    def decide(self, session: CacheSession, module: nn.Module) -> Any:
        state = session.state(self, _State)
        timestep = self.timestep(session)
        in_range = timestep is not None and self.low < timestep < self.high
        if (
            state.cache is None
            or state.iteration == 0
            or not in_range
            or state.iteration % self.block_skip_range == 0
        ):
            return None
        return state.cache

    def record(self, session: CacheSession, module: nn.Module, output: Any, computed: bool) -> None:
        state = session.state(self, _State)
        state.cache = output
        state.iteration += 1

    def __call__(self, call: ModuleCall) -> Any:
        return decide_and_record(self, call)


def _classify(
    config: PyramidAttentionBroadcastConfig, spatial_range: int | None, site: AttentionSite
) -> tuple[int, tuple[float, float]] | None:
    is_cross = site.kind == "cross"
    if (
        not is_cross
        and spatial_range is not None
        and check.search_any(config.spatial_attention_block_identifiers, site.name)
    ):
        return spatial_range, config.spatial_attention_timestep_skip_range
    if (
        not is_cross
        and config.temporal_attention_block_skip_range is not None
        and check.search_any(config.temporal_attention_block_identifiers, site.name)
    ):
        return config.temporal_attention_block_skip_range, config.temporal_attention_timestep_skip_range
    if (
        is_cross
        and config.cross_attention_block_skip_range is not None
        and check.search_any(config.cross_attention_block_identifiers, site.name)
    ):
        return config.cross_attention_block_skip_range, config.cross_attention_timestep_skip_range
    return None


def timestep_reader(callback: Callable[[], Any] | None) -> Callable[[CacheSession], Any]:
    if callback is None:
        return lambda session: session.current_timestep
    return lambda session: callback()


def plan(config: PyramidAttentionBroadcastConfig, layout: ModelLayout) -> Plan:
    spatial_range = config.spatial_attention_block_skip_range
    if (
        spatial_range is None
        and config.temporal_attention_block_skip_range is None
        and config.cross_attention_block_skip_range is None
    ):
        # The reference falls back to this too, rather than doing nothing.
        logger.info("no attention skip range set; using spatial_attention_block_skip_range=2")
        spatial_range = _DEFAULT_SKIP_RANGE
    timestep = timestep_reader(config.current_timestep_callback)
    handlers: dict[nn.Module, Handler] = {}
    for site in layout.attention:
        found = _classify(config, spatial_range, site)
        if found is not None:
            handlers[site.module] = _BroadcastHandler(found[0], found[1], timestep)
    if not handlers:
        raise UnsupportedMethodError(NAME, layout, "no attention module matches the configured identifiers")
    return Plan(method=NAME, handlers=handlers)
