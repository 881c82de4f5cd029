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
from .errors import UnsupportedMethodError
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

    __slots__ = ("head_block_output", "head_block_residual", "should_compute", "tail_block_residuals")

    def __init__(self) -> None:
        self.head_block_output: Any = None
        self.head_block_residual: torch.Tensor | None = None
        self.tail_block_residuals: tuple[Any, Any] | None = None
        self.should_compute = True


def _hidden(site: BlockSite, output: Any) -> torch.Tensor:
    if isinstance(output, tuple):
        return output[site.hidden_states_index or 0]
    return output


class _HeadBlockHandler:
    def __init__(self, site: BlockSite, threshold: float, key: object) -> None:
        self.site = site
        self.threshold = threshold
        self.key = key

    def __call__(self, call: ModuleCall) -> Any:
        site = self.site
        hidden_in = site.argument("hidden_states", call.args, call.kwargs)
        output = call.run()
        is_tuple = isinstance(output, tuple)
        residual = _hidden(site, output) - hidden_in
        state = call.session.state(self.key, _SharedState)
        state.should_compute = self._should_compute(state, residual)
        if not state.should_compute:
            assert state.tail_block_residuals is not None
            hidden = state.tail_block_residuals[0] + _hidden(site, output)
            if not is_tuple:
                return hidden
            result: list[Any] = [None] * len(output)
            result[site.hidden_states_index or 0] = hidden
            encoder_residual = state.tail_block_residuals[1]
            if site.encoder_hidden_states_index is not None and encoder_residual is not None:
                result[site.encoder_hidden_states_index] = (
                    encoder_residual + output[site.encoder_hidden_states_index]
                )
            return tuple(result)
        if is_tuple:
            encoder = (
                None if site.encoder_hidden_states_index is None else output[site.encoder_hidden_states_index]
            )
            state.head_block_output = (_hidden(site, output), encoder)
        else:
            state.head_block_output = output
        state.head_block_residual = residual
        return output

    def _should_compute(self, state: _SharedState, residual: torch.Tensor) -> bool:
        previous = state.head_block_residual
        if previous is None:
            return True
        change = (residual - previous).abs().mean() / previous.abs().mean()
        return bool(change.item() > self.threshold)


class _FollowerBlockHandler:
    def __init__(self, site: BlockSite, key: object, is_tail: bool) -> None:
        self.site = site
        self.key = key
        self.is_tail = is_tail

    def __call__(self, call: ModuleCall) -> Any:
        site = self.site
        state = call.session.state(self.key, _SharedState)
        if state.should_compute:
            output = call.run()
            if self.is_tail:
                self._record_tail_residuals(state, output)
            return output
        hidden_in = site.argument("hidden_states", call.args, call.kwargs)
        if site.encoder_hidden_states_index is None:
            return hidden_in
        encoder_in = site.argument("encoder_hidden_states", call.args, call.kwargs)
        result: list[Any] = [None, None]
        result[site.hidden_states_index or 0] = hidden_in
        result[site.encoder_hidden_states_index] = encoder_in
        return tuple(result)

    def _record_tail_residuals(self, state: _SharedState, output: Any) -> None:
        head = state.head_block_output
        if isinstance(output, tuple):
            site = self.site
            encoder_index = site.encoder_hidden_states_index
            # SD3's last block returns no text stream (context_pre_only): nothing to carry over then.
            encoder_out = None if encoder_index is None else output[encoder_index]
            encoder_residual = None if encoder_out is None or head[1] is None else encoder_out - head[1]
            state.tail_block_residuals = (output[site.hidden_states_index or 0] - head[0], encoder_residual)
        elif isinstance(head, tuple) and head[1] is not None:
            # A joint-stream tail (Flux2's single blocks) returns text and image tokens concatenated in
            # that order, as it received them; the head returned them apart, so the residual is split.
            hidden, encoder = head
            text_tokens = encoder.shape[1]
            joined = output - torch.cat([encoder, hidden], dim=1)
            state.tail_block_residuals = (joined[:, text_tokens:], joined[:, :text_tokens])
        else:
            state.tail_block_residuals = (output - head, None)


def plan(config: FirstBlockCacheConfig, layout: ModelLayout) -> Plan:
    blocks = layout.blocks
    if len(blocks) < 2:
        raise UnsupportedMethodError(
            NAME, layout, f"needs at least two transformer blocks, found {len(blocks)}"
        )
    key = object()
    handlers: dict[nn.Module, Handler] = {
        blocks[0].module: _HeadBlockHandler(blocks[0], config.threshold, key)
    }
    for index, site in enumerate(blocks[1:], start=1):
        handlers[site.module] = _FollowerBlockHandler(site, key, is_tail=index == len(blocks) - 1)
    return Plan(method=NAME, handlers=handlers)
