"""SeaCache: skip the block stack while a spectrally filtered view of the latents barely moves.

Each denoiser call filters its input latents with a Wiener-like gain built from the noise level
(``sigma``) and a power-law prior on the clean signal (``power_exp``), the SEA indicator. The
relative L1 change of that indicator from the previous step is accumulated; while the sum stays
below ``threshold`` (and at most ``max_consecutive_cached`` calls in a row), the blocks are replaced
by the residual they added at the last full execution, linearly extrapolated from the last two
(``residual_order=1``) or reused as is (``0``). The first ``retention_steps`` and the last
``cache_end_steps`` steps always run in full. Decisions are per branch (cond, uncond) and session.

Departures from the reference (diffusers' ``hooks/sea_cache.py``), which runs only where its pipeline
passes ``cache_context(name, step_index=..., sigma=..., num_inference_steps=...)`` and a model
adapter finds the latents (Wan text-to-video, Cosmos 3), and fails open (never skips) elsewhere:
- the scheduler position comes from the session: the step index counts the branch's denoiser calls,
  ``sigma`` is the denoising timestep over 1000 (read through the family table), and the step count
  is ``num_inference_steps`` of the config (an addition), else the one the pipeline gives its
  ``cache_context`` (Wan), as the reference reads it; with neither, ``cache_end_steps`` cannot apply;
- the latents come from the denoiser's ``hidden_states`` laid out by the family table (channels,
  frames, height, width; a token sequence stands for the spatial axes), on every family;
- a tail block that returns no text stream (SD3's last block) or the fused text+image sequence
  (Flux2's single-stream blocks) still records its residual; the reference records none there.
Cosmos 3's decoder-stack and post-norm boundaries are not implemented: its blocks are cached as any
other model's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _validation as check
from ._fields import documented
from .errors import InvalidConfigValue, UnsupportedMethodError, require_block_chain
from .session import Handler, ModuleCall, Plan
from .targets import BlockSite, ModelLayout

NAME = "sea_cache"

logger = logging.getLogger(__name__)

# (transformer, forward args, forward kwargs) -> the generated latents, each (C, T, H, W).
RawVisionCallback = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], list[torch.Tensor] | None]


@dataclass(frozen=True)
class SeaCacheConfig:
    threshold: float = documented(
        0.25,
        "Budget of the accumulated relative L1 change of the SEA indicator: the blocks are replaced by the "
        "cached residual while the sum stays below it.",
    )
    residual_order: int = documented(
        1,
        "0 reuses the last residual; 1 extrapolates linearly from the last two.",
    )
    retention_steps: int = documented(
        1,
        "Number of initial steps that always compute in full.",
    )
    cache_end_steps: int = documented(
        1,
        "Number of final steps that always compute in full (needs num_inference_steps).",
    )
    max_consecutive_cached: int = documented(
        2,
        "At most this many reuses in a row (0: no limit).",
    )
    power_exp: float = documented(
        3.0,
        "Exponent of the clean-signal power prior of the filter (> 0).",
    )
    raw_vision_callback: RawVisionCallback | None = documented(
        None,
        "(transformer, args, kwargs) -> [latent (C, T, H, W), ...], for models the family table does not "
        "describe. None: the latents are the denoiser's hidden_states, laid out by the family table.",
    )
    # Not in the reference, whose pipeline passes it to cache_context.
    num_inference_steps: int | None = documented(
        None,
        "The run's step count, which places the last cache_end_steps steps; calls past it run in full. "
        "None: cache_end_steps cannot apply.",
    )

    def __post_init__(self) -> None:
        check.number("threshold", self.threshold, minimum=0.0)
        order = self.residual_order
        if isinstance(order, bool) or not isinstance(order, int) or order not in (0, 1):
            raise InvalidConfigValue(
                f"residual_order must be 0 or 1, got {self.residual_order!r}", field="residual_order"
            )
        check.non_negative_int("retention_steps", self.retention_steps)
        check.non_negative_int("cache_end_steps", self.cache_end_steps)
        check.non_negative_int("max_consecutive_cached", self.max_consecutive_cached)
        check.number("power_exp", self.power_exp)
        if self.power_exp <= 0:
            raise InvalidConfigValue(f"power_exp must be positive, got {self.power_exp!r}", field="power_exp")
        check.callback("raw_vision_callback", self.raw_vision_callback)
        check.positive_int("num_inference_steps", self.num_inference_steps, optional=True)


@dataclass(frozen=True)
class _Position:
    """Where the denoising loop is, and the latents of this call."""

    step_index: int
    sigma: float
    num_inference_steps: int | None
    raw_vision: list[torch.Tensor]


HistoryEntry = tuple[int, "torch.Tensor | None", torch.Tensor]


class _State:
    """One branch's trajectory (history, gate) and the bookkeeping of the denoiser call in progress."""

    def __init__(self) -> None:
        self.calls = 0
        self.position: _Position | None = None
        # Per run of blocks with one stream layout (ModelLayout.stream_chains): (step, text stream out,
        # residual) of its last full executions.
        self.histories: dict[int, list[HistoryEntry]] = {}
        self.gate_key: tuple[int, float] | None = None
        self.gate_should_compute = True
        self.previous_indicator: list[torch.Tensor] | None = None
        self.accumulated_distance = 0.0
        self.consecutive_cached = 0
        self.reset_forward()

    def reset_forward(self) -> None:
        self.skip_remaining = False
        self.full_execution_pending = False
        self.cacheable_execution = False
        self.step_index: int | None = None
        # The image stream each run started from in this call, and what each run replays when skipped.
        self.gen_inputs: dict[int, torch.Tensor] = {}
        self.replays: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def reset_trajectory(self) -> None:
        self.histories = {}
        self.gate_key = None
        self.gate_should_compute = True
        self.previous_indicator = None
        self.accumulated_distance = 0.0
        self.consecutive_cached = 0


# -- the SEA indicator ---------------------------------------------------------------------------------


def _apply_sea_filter(hidden_states: torch.Tensor, sigma: float, power_exp: float) -> torch.Tensor:
    """The reference's filter of one (T, H, W, C) latent, unchanged."""
    hidden_states_dtype = hidden_states.dtype
    hidden_states = hidden_states.contiguous().float()
    dimensions = (0, 1, 2)
    spectrum = torch.fft.fftn(hidden_states, dim=dimensions)

    sigma = max(1e-6, min(1.0 - 1e-6, sigma))
    signal_scale = 1.0 - sigma
    noise_scale = sigma
    gain: torch.Tensor | None = None
    for axis in dimensions:
        frequencies = torch.fft.fftfreq(
            hidden_states.shape[axis], device=hidden_states.device, dtype=torch.float32
        )
        clean_power = 1.0 / (frequencies.abs().pow(power_exp) + 1e-16)
        axis_gain = signal_scale * clean_power / (signal_scale**2 * clean_power + noise_scale**2 + 1e-16)
        axis_shape = [1] * hidden_states.ndim
        axis_shape[axis] = axis_gain.shape[0]
        gain = axis_gain.reshape(axis_shape) if gain is None else gain * axis_gain.reshape(axis_shape)
    assert gain is not None
    # The paper's Eq. (7): the combined response normalised to unit mean, so that distances are
    # comparable across steps.
    mean_gain = gain.mean()
    if torch.isfinite(mean_gain) and mean_gain > 0:
        gain = gain / mean_gain
    return torch.fft.ifftn(spectrum * gain, dim=dimensions).real.to(hidden_states_dtype)


def _indicator(config: SeaCacheConfig, position: _Position) -> list[torch.Tensor]:
    return [
        _apply_sea_filter(latent.movedim(0, -1), sigma=position.sigma, power_exp=config.power_exp).detach()
        for latent in position.raw_vision
    ]


def _latents_from_layout(
    layout: ModelLayout, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[torch.Tensor] | None:
    """The denoiser's input latents, one (C, T, H, W) tensor per batch element.

    The input is laid out as the family's output (the table's ``output_format``). A token sequence
    ``[B, S, C]`` has no spatial axes to recover without model knowledge: its tokens stand on one axis.
    """
    hidden = layout.denoiser_reader.get(layout.family.latent_argument, args, kwargs)
    if isinstance(hidden, (list, tuple)) and hidden and all(isinstance(one, torch.Tensor) for one in hidden):
        # One tensor per sample (Z-Image: C, F, H, W; Cosmos 3: 1, C, T, H, W).
        return [one[0] if one.ndim == 5 else one if one.ndim == 4 else one.unsqueeze(1) for one in hidden]
    if not isinstance(hidden, torch.Tensor):
        return None
    if hidden.ndim == 6:
        # Several images per sample (JoyImage edits: B, N, C, F, H, W): their frames one after another.
        latents = hidden.transpose(1, 2).flatten(2, 3)
    elif hidden.ndim == 5:
        latents = hidden.transpose(1, 2) if layout.family.output_format == "BFCHW" else hidden
    elif hidden.ndim == 4:
        latents = hidden.unsqueeze(2)
    elif hidden.ndim == 3:
        latents = hidden.transpose(1, 2)[:, :, None, None, :]
    else:
        return None
    # Image-conditioned inputs (Wan image-to-video) append the condition's channels after the noisy
    # latents; only the latents are the generated output.
    out_channels = getattr(getattr(layout.denoiser, "config", None), "out_channels", None)
    if hidden.ndim > 3 and isinstance(out_channels, int) and 0 < out_channels < latents.shape[1]:
        latents = latents[:, :out_channels]
    return list(latents.unbind(dim=0))


# -- the gate ------------------------------------------------------------------------------------------


def _distance(indicator: list[torch.Tensor], previous: list[torch.Tensor]) -> float:
    """Mean relative L1 change over the batch's latents; infinite when the history does not fit."""
    if len(indicator) != len(previous) or not indicator:
        return math.inf
    distance = 0.0
    for current, before in zip(indicator, previous, strict=True):
        if current.shape != before.shape or current.device != before.device or current.dtype != before.dtype:
            return math.inf
        numerator = (current.float() - before.float()).abs().mean()
        denominator = before.float().abs().mean() + 1e-16
        distance += float((numerator / denominator).detach().cpu())
    return distance / len(indicator)


def _resolve_gate(
    state: _State, position: _Position, indicator: list[torch.Tensor] | None, config: SeaCacheConfig
) -> bool:
    """Whether this call runs the blocks: the reference's gate, step for step."""
    gate_key = (position.step_index, position.sigma)
    if state.gate_key == gate_key:
        return state.gate_should_compute

    is_non_adjacent = state.gate_key is not None and position.step_index != state.gate_key[0] + 1
    if is_non_adjacent:
        logger.debug("SeaCache received non-adjacent steps; running in full")
        state.reset_trajectory()
    steps = position.num_inference_steps
    is_retained = position.step_index < config.retention_steps
    is_in_cache_end = steps is not None and position.step_index >= steps - config.cache_end_steps
    is_first_observation = state.previous_indicator is None
    is_max_consecutive = bool(
        config.max_consecutive_cached and state.consecutive_cached >= config.max_consecutive_cached
    )
    forced = is_non_adjacent or indicator is None or is_retained or is_in_cache_end or is_first_observation
    candidate = 0.0
    if forced or is_max_consecutive:
        should_compute = True
    else:
        assert indicator is not None and state.previous_indicator is not None
        distance = _distance(indicator, state.previous_indicator)
        if not math.isfinite(distance):
            logger.debug("SeaCache indicator changed shape, device or dtype; running in full")
        candidate = state.accumulated_distance + distance
        should_compute = not math.isfinite(distance) or candidate >= config.threshold

    state.accumulated_distance = 0.0 if should_compute else candidate
    state.gate_key = gate_key
    state.gate_should_compute = should_compute
    state.previous_indicator = None if indicator is None else [value.detach() for value in indicator]
    return should_compute


# -- handlers ------------------------------------------------------------------------------------------


class _Shared:
    """What every handler of one plan shares: the config and the layout; also the key of the branch state."""

    def __init__(self, config: SeaCacheConfig, layout: ModelLayout) -> None:
        self.config = config
        self.layout = layout


class _DenoiserHandler:
    """Reads where the loop is and the latents before the blocks run; clears the call's state after."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared

    def __call__(self, call: ModuleCall) -> Any:
        state = call.session.state(self.shared, _State)
        state.reset_forward()
        state.position = self._position(call, state.calls)
        state.calls += 1
        try:
            return call.run()
        finally:
            state.position = None
            state.reset_forward()

    def _position(self, call: ModuleCall, step_index: int) -> _Position | None:
        config = self.shared.config
        if torch.is_grad_enabled():
            logger.debug("SeaCache is inference-only; a call with autograd enabled runs in full")
            return None
        timestep = call.session.current_timestep
        sigma = None if timestep is None else timestep / 1000.0
        # The config's count, else the one the pipeline gives its cache_context (Wan), as the reference reads.
        steps = config.num_inference_steps
        if steps is None:
            told = call.session.loop_position.get("num_inference_steps")
            steps = told if isinstance(told, int) and told > 0 else None
        if sigma is None or not math.isfinite(sigma) or not 0.0 <= sigma <= 1.0:
            logger.debug("SeaCache found no noise level in [0, 1] (timestep %s); running in full", timestep)
            return None
        if steps is not None and step_index >= steps:
            logger.debug(
                "SeaCache call %d is past num_inference_steps=%d; running in full", step_index, steps
            )
            return None
        try:
            if config.raw_vision_callback is not None:
                raw_vision = config.raw_vision_callback(call.module, call.args, call.kwargs)
            else:
                raw_vision = _latents_from_layout(self.shared.layout, call.args, call.kwargs)
        except (TypeError, ValueError, RuntimeError) as error:
            logger.debug("SeaCache could not read the latents (%s); running in full", error)
            return None
        if not raw_vision:
            return None
        return _Position(step_index, sigma, steps, list(raw_vision))


@dataclass(frozen=True)
class _Role:
    chain: int
    first: bool  # the first block of its run; of run 0, the leader that decides
    last: bool  # the last block of its run: records the run's residual after a full execution


class _BlockHandler:
    """The leader decides for the call; on a skipped call each run's first block serves the run's cached
    residual and the other blocks pass their input through; after a full one each run records its own."""

    def __init__(self, site: BlockSite, shared: _Shared, role: _Role) -> None:
        self.site = site
        self.shared = shared
        self.role = role

    def __call__(self, call: ModuleCall) -> Any:
        state = call.session.state(self.shared, _State)
        site, role = self.site, self.role
        if role.chain == 0 and role.first:
            self._lead(call, state)
        if state.skip_remaining:
            hidden, encoder = site.inputs(call.args, call.kwargs)
            if role.first:
                residual, cached_und = state.replays[role.chain]
                hidden = hidden + residual
                encoder = encoder if cached_und is None else cached_und
            return site.pack(hidden, encoder)
        if role.first:
            state.gen_inputs[role.chain] = site.hidden_input(call.args, call.kwargs)
        output = call.run()
        if role.last and state.full_execution_pending:
            self._record(state, output)
        return output

    def _lead(self, call: ModuleCall, state: _State) -> None:
        """Decide whether this call runs the blocks or replays every run's residual."""
        site = self.site
        config = self.shared.config
        chains = len(self.shared.layout.stream_chains)
        hidden, encoder = site.inputs(call.args, call.kwargs)
        state.reset_forward()
        state.full_execution_pending = True
        position = state.position
        if position is None:
            return
        state.step_index = position.step_index
        state.cacheable_execution = True
        try:
            indicator: list[torch.Tensor] | None = _indicator(config, position)
        except (TypeError, ValueError, RuntimeError) as error:
            logger.debug("SeaCache could not build its indicator (%s); running in full", error)
            indicator = None
        should_compute = _resolve_gate(state, position, indicator, config)
        histories = [state.histories.get(chain, []) for chain in range(chains)]
        if should_compute or not all(histories):
            if not should_compute:
                state.accumulated_distance = 0.0
            return
        if not self._fits(histories[0], hidden, encoder) or len({h[-1][0] for h in histories}) != 1:
            state.reset_trajectory()
            logger.debug("SeaCache residual history changed shape, device or dtype; running in full")
            return
        for chain, history in enumerate(histories):
            state.replays[chain] = (_extrapolated(history, position.step_index, config), history[-1][1])
        state.skip_remaining = True
        state.full_execution_pending = False
        state.consecutive_cached += 1

    def _fits(self, history: list[HistoryEntry], hidden: torch.Tensor, encoder: torch.Tensor | None) -> bool:
        cached_und = history[-1][1]
        if self.site.encoder_hidden_states_index is not None:
            # A tail without a text stream (SD3) leaves none to replay: the input's passes through.
            mismatch = encoder is None or (
                cached_und is not None
                and (
                    cached_und.shape != encoder.shape
                    or cached_und.device != encoder.device
                    or cached_und.dtype != encoder.dtype
                )
            )
        else:
            mismatch = cached_und is not None
        return not mismatch and all(
            residual.shape == hidden.shape
            and residual.device == hidden.device
            and residual.dtype == hidden.dtype
            for _, _, residual in history
        )

    def _record(self, state: _State, output: Any) -> None:
        site, chain = self.site, self.role.chain
        gen_output, und_output = site.streams(output)
        if self.role.chain == len(self.shared.layout.stream_chains) - 1:
            state.consecutive_cached = 0
        gen_input = state.gen_inputs.pop(chain, None)
        if (
            state.cacheable_execution
            and state.step_index is not None
            and gen_input is not None
            and gen_output.shape == gen_input.shape
        ):
            und = None if und_output is None else und_output.detach().clone()
            history = state.histories.setdefault(chain, [])
            history.append((state.step_index, und, (gen_output - gen_input).detach().clone()))
            del history[: -(self.shared.config.residual_order + 1)]


def _extrapolated(history: list[HistoryEntry], step_index: int, config: SeaCacheConfig) -> torch.Tensor:
    """The residual a run is expected to add at ``step_index``: the latest, extended linearly along the
    last two at residual order 1."""
    latest_step, _, latest_residual = history[-1]
    if config.residual_order == 1 and len(history) >= 2:
        previous_step, _, previous_residual = history[-2]
        if latest_step != previous_step:
            step_scale = (step_index - latest_step) / (latest_step - previous_step)
            return latest_residual + (latest_residual - previous_residual) * step_scale
    return latest_residual


def plan(config: SeaCacheConfig, layout: ModelLayout) -> Plan:
    blocks = layout.blocks
    if not blocks:
        raise UnsupportedMethodError(NAME, layout, "found no repeated transformer blocks")
    require_block_chain(NAME, layout)
    shared = _Shared(config, layout)
    handlers: dict[nn.Module, Handler] = {layout.denoiser: _DenoiserHandler(shared)}
    for chain_index, chain in enumerate(layout.stream_chains):
        for index, site in enumerate(chain):
            role = _Role(chain=chain_index, first=index == 0, last=index == len(chain) - 1)
            handlers[site.module] = _BlockHandler(site, shared, role)
    return Plan(method=NAME, handlers=handlers)
