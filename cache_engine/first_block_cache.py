"""FirstBlockCache: when the first block's residual barely changed, skip the remaining blocks.

The remaining blocks are replaced by the residual they added the last time they ran. One decision
per denoiser call and branch, made from the relative mean absolute change of the first block's
residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _validation as check
from ._fields import documented
from .errors import UnsupportedMethodError, require_block_chain
from .session import Handler, ModuleCall, Plan
from .targets import BlockSite, ModelLayout

NAME = "first_block_cache"


@dataclass(frozen=True)
class FirstBlockCacheConfig:
    threshold: float = documented(
        0.05,
        "Skip the blocks after the first (replaced by the residual they added the last time they ran) while "
        "the relative mean absolute change of the first block's residual since that call is at most this; "
        ">= 0, higher skips more at some cost in quality.",
    )

    def __post_init__(self) -> None:
        check.number("threshold", self.threshold, minimum=0.0)


class _SharedState:
    """One per branch, shared by the head block and the blocks it may skip."""

    __slots__ = ("chain_inputs", "chain_residuals", "head_block_residual", "should_compute")

    def __init__(self) -> None:
        self.head_block_residual: torch.Tensor | None = None
        self.should_compute = True
        # Per run of blocks with one stream layout (ModelLayout.stream_chains): the streams it started
        # from on the last full call, and what it added to them. The head's run starts at its output.
        self.chain_inputs: dict[int, Streams] = {}
        self.chain_residuals: dict[int, Streams] = {}


Streams = tuple[torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class _Role:
    chain: int
    first: bool  # the first block of its run (the head, for run 0)
    last: bool  # the last block of its run: records what the run added


def _added(streams: Streams, residuals: Streams) -> Streams:
    hidden, encoder = streams
    hidden_residual, encoder_residual = residuals
    if encoder is not None and encoder_residual is not None:
        encoder = encoder + encoder_residual
    return hidden + hidden_residual, encoder


def _difference(after: Streams, before: Streams) -> Streams:
    # SD3's last block returns no text stream (context_pre_only): nothing to carry over then.
    encoder = None if after[1] is None or before[1] is None else after[1] - before[1]
    return after[0] - before[0], encoder


class _BlockHandler:
    def __init__(self, site: BlockSite, role: _Role, threshold: float, key: object) -> None:
        self.site = site
        self.role = role
        self.threshold = threshold
        self.key = key

    @property
    def is_head(self) -> bool:
        return self.role.chain == 0 and self.role.first

    def __call__(self, call: ModuleCall) -> Any:
        state = call.session.state(self.key, _SharedState)
        if self.is_head:
            return self._head(call, state)
        site, role = self.site, self.role
        if not state.should_compute:
            streams = site.inputs(call.args, call.kwargs)
            if role.first:
                streams = _added(streams, state.chain_residuals[role.chain])
            return site.pack(*streams)
        if role.first:
            state.chain_inputs[role.chain] = site.inputs(call.args, call.kwargs)
        output = call.run()
        if role.last:
            state.chain_residuals[role.chain] = _difference(
                site.streams(output), state.chain_inputs.pop(role.chain)
            )
        return output

    def _head(self, call: ModuleCall, state: _SharedState) -> Any:
        site = self.site
        hidden_in = site.hidden_input(call.args, call.kwargs)
        output = call.run()
        streams = site.streams(output)
        residual = streams[0] - hidden_in
        state.should_compute = self._should_compute(state, residual)
        if not state.should_compute:
            return site.pack(*_added(streams, state.chain_residuals[0]))
        # Compared with the residual of the last call that computed, as the reference does.
        state.head_block_residual = residual
        if self.role.last:
            state.chain_residuals[0] = _difference(streams, streams)
        else:
            state.chain_inputs[0] = streams
        return output

    def _should_compute(self, state: _SharedState, residual: torch.Tensor) -> bool:
        previous = state.head_block_residual
        if previous is None or previous.shape != residual.shape or not state.chain_residuals:
            return True
        change = (residual - previous).abs().mean() / previous.abs().mean()
        return bool(change.item() > self.threshold)


def plan(config: FirstBlockCacheConfig, layout: ModelLayout) -> Plan:
    blocks = layout.blocks
    if len(blocks) < 2:
        raise UnsupportedMethodError(
            NAME, layout, f"needs at least two transformer blocks, found {len(blocks)}"
        )
    require_block_chain(NAME, layout)
    key = object()
    handlers: dict[nn.Module, Handler] = {}
    for chain_index, chain in enumerate(layout.stream_chains):
        for index, site in enumerate(chain):
            role = _Role(chain=chain_index, first=index == 0, last=index == len(chain) - 1)
            handlers[site.module] = _BlockHandler(site, role, config.threshold, key)
    return Plan(method=NAME, handlers=handlers)
