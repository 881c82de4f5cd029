"""FasterCache: reuse attention outputs across steps and approximate the unconditional pass.

Two parts, as in the reference: a denoiser handler that, on some steps, skips the unconditional
(CFG) pass and rebuilds it from the conditional output plus the low- and high-frequency difference
recorded at the last step that computed both; and attention handlers that extrapolate attention
outputs from the last two computed ones on the calls where that pass was skipped.

Departures from the reference, each forced by a case where it breaks:

- Separate cond/uncond calls (Wan, HunyuanVideo, Flux with true CFG): the reference assumes both
  passes in one batch and raises. Here the ``uncond`` call of a skipping step is not run at all: its
  output is rebuilt from the same step's ``cond`` output. Attention may be extrapolated in that
  step's ``cond`` call, the counterpart of the reference's half-batch call.
- Token-sequence outputs ``[B, S, C]`` (Flux, LTX): the reference supports only image/video layouts
  and raises. Here the frequency split runs along the token axis.
- ``tensor_format``: the output layout is a property of the model, so for families in the model
  table the table's layout is used; the config's value applies to unknown families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _validation as check
from ._fields import documented
from .errors import InvalidConfigValue, UnsupportedMethodError
from .pyramid_attention_broadcast import timestep_reader
from .session import CacheSession, Handler, ModuleCall, Plan
from .targets import GENERIC_FAMILY, ModelLayout, TensorFormat

NAME = "faster_cache"

_ATTENTION_PATTERNS = (
    "^blocks.*attn",
    "^transformer_blocks.*attn",
    "^single_transformer_blocks.*attn",
    "^temporal_transformer_blocks.*attn",
)
_TENSOR_FORMATS = ("BCFHW", "BFCHW", "BCHW")
_SEPARATE_BRANCHES = ("cond", "uncond")


@dataclass(frozen=True)
class FasterCacheConfig:
    spatial_attention_block_skip_range: int = documented(
        2,
        "Compute each spatial self-attention module every N-th call; on the calls between, within "
        "spatial_attention_timestep_skip_range, a call made without the unconditional pass (skipped, or "
        "absent) extrapolates its output from the last two.",
    )
    temporal_attention_block_skip_range: int | None = documented(
        None,
        "Compute each temporal self-attention module every N-th call; on the calls between, within "
        "temporal_attention_timestep_skip_range, a call made without the unconditional pass (skipped, or "
        "absent) extrapolates its output from the last two. None: temporal attention is not cached.",
    )
    spatial_attention_timestep_skip_range: tuple[float, float] = documented(
        (-1, 681),
        "(low, high) timesteps on the 0..1000 scale: spatial attention may be skipped only while "
        "low < timestep < high; the default skips from timestep 681 to the end of denoising.",
    )
    temporal_attention_timestep_skip_range: tuple[float, float] = documented(
        (-1, 681),
        "(low, high) timesteps on the 0..1000 scale: temporal attention may be skipped only while "
        "low < timestep < high.",
    )
    low_frequency_weight_update_timestep_range: tuple[float, float] = documented(
        (99, 901),
        "(low, high) timesteps on the 0..1000 scale within which alpha_low_frequency scales the "
        "low-frequency difference (1.0 outside it); unused with low_frequency_weight_callback.",
    )
    high_frequency_weight_update_timestep_range: tuple[float, float] = documented(
        (-1, 301),
        "(low, high) timesteps on the 0..1000 scale within which alpha_high_frequency scales the "
        "high-frequency difference (1.0 outside it); unused with high_frequency_weight_callback.",
    )
    alpha_low_frequency: float = documented(
        1.1,
        "Factor applied to the recorded low-frequency difference between the unconditional and conditional "
        "outputs at each step that rebuilds the unconditional output from the conditional one.",
    )
    alpha_high_frequency: float = documented(
        1.1,
        "Factor applied to the recorded high-frequency difference between the unconditional and "
        "conditional outputs at each step that rebuilds the unconditional output from the conditional one.",
    )
    unconditional_batch_skip_range: int = documented(
        5,
        "Compute the unconditional (CFG) pass every N-th step; on the N - 1 steps between, within "
        "unconditional_batch_timestep_skip_range, it is rebuilt from the conditional output plus the "
        "low- and high-frequency difference recorded at the last step that computed both.",
    )
    unconditional_batch_timestep_skip_range: tuple[float, float] = documented(
        (-1, 641),
        "(low, high) timesteps on the 0..1000 scale: the unconditional pass may be skipped only while "
        "low < timestep < high.",
    )
    spatial_attention_block_identifiers: tuple[str, ...] = documented(
        (
            "^blocks.*attn",
            "^transformer_blocks.*attn",
            "^single_transformer_blocks.*attn",
        ),
        "Regular expressions searched (re.search) in the names of the transformer blocks' self-attention "
        "modules: a module matching one is cached as spatial attention.",
    )
    temporal_attention_block_identifiers: tuple[str, ...] = documented(
        ("^temporal_transformer_blocks.*attn",),
        "Regular expressions searched (re.search) in the names of the transformer blocks' self-attention "
        "modules: a module matching one, and no spatial identifier, is cached as temporal attention.",
    )
    attention_weight_callback: Callable[[nn.Module], float] | None = documented(
        None,
        "Called with the attention module, returns the weight w of a skipped call's extrapolation, "
        "last + (last - before) * w. None: 0.5 at every step.",
    )
    low_frequency_weight_callback: Callable[[nn.Module], float] | None = documented(
        None,
        "Called with the denoiser, returns the factor applied to the low-frequency difference at a step "
        "that rebuilds the unconditional output. None: alpha_low_frequency within "
        "low_frequency_weight_update_timestep_range, 1.0 outside it.",
    )
    high_frequency_weight_callback: Callable[[nn.Module], float] | None = documented(
        None,
        "Called with the denoiser, returns the factor applied to the high-frequency difference at a step "
        "that rebuilds the unconditional output. None: alpha_high_frequency within "
        "high_frequency_weight_update_timestep_range, 1.0 outside it.",
    )
    tensor_format: str = documented(
        "BCFHW",
        "Layout of the denoiser's output, one of BCFHW, BFCHW or BCHW, along which the low and high "
        "frequencies are split; used only for families the model table does not describe.",
    )
    is_guidance_distilled: bool = documented(
        False,
        "Whether the model is guidance-distilled, with no unconditional pass to skip: then only attention "
        "is cached, extrapolated on every call between computed ones within its timestep range.",
    )
    current_timestep_callback: Callable[[], Any] | None = documented(
        None,
        "Returns the current denoising timestep on the 0..1000 scale. None: the timestep is read from the "
        "denoiser's timestep argument, mapped to that scale by the model's family table.",
    )
    _unconditional_conditional_input_kwargs_identifiers: tuple[str, ...] = documented(
        (
            "hidden_states",
            "encoder_hidden_states",
            "timestep",
            "attention_mask",
            "encoder_attention_mask",
        ),
        "Exact names of the denoiser's keyword arguments that hold the unconditional and conditional "
        "inputs concatenated along the batch; at a step that skips the unconditional pass, they are cut "
        "to their conditional half.",
    )

    def __post_init__(self) -> None:
        check.positive_int("spatial_attention_block_skip_range", self.spatial_attention_block_skip_range)
        check.positive_int(
            "temporal_attention_block_skip_range", self.temporal_attention_block_skip_range, optional=True
        )
        check.positive_int("unconditional_batch_skip_range", self.unconditional_batch_skip_range)
        for field in (
            "spatial_attention_timestep_skip_range",
            "temporal_attention_timestep_skip_range",
            "low_frequency_weight_update_timestep_range",
            "high_frequency_weight_update_timestep_range",
            "unconditional_batch_timestep_skip_range",
        ):
            object.__setattr__(self, field, check.timestep_range(field, getattr(self, field)))
        check.number("alpha_low_frequency", self.alpha_low_frequency)
        check.number("alpha_high_frequency", self.alpha_high_frequency)
        for field in (
            "spatial_attention_block_identifiers",
            "temporal_attention_block_identifiers",
            "_unconditional_conditional_input_kwargs_identifiers",
        ):
            object.__setattr__(self, field, check.patterns(field, getattr(self, field)))
        for field in (
            "attention_weight_callback",
            "low_frequency_weight_callback",
            "high_frequency_weight_callback",
            "current_timestep_callback",
        ):
            check.callback(field, getattr(self, field))
        if self.tensor_format not in _TENSOR_FORMATS:
            raise InvalidConfigValue(
                f"tensor_format must be one of {list(_TENSOR_FORMATS)}, got {self.tensor_format!r}",
                field="tensor_format",
            )
        if not isinstance(self.is_guidance_distilled, bool):
            raise InvalidConfigValue(
                f"is_guidance_distilled must be a boolean, got {self.is_guidance_distilled!r}",
                field="is_guidance_distilled",
            )


# -- frequency split --------------------------------------------------------------------------------


def _format_of(hidden: torch.Tensor, declared: TensorFormat) -> TensorFormat:
    """The layout of ``hidden``: the declared one where its rank allows, else the one its rank implies
    (a model outside the family table outputs images as [B, C, H, W] whatever the config's default)."""
    if hidden.ndim == 5:
        return declared if declared in ("BCFHW", "BFCHW") else "BCFHW"
    return "BCHW" if hidden.ndim == 4 else "BSC"


def _to_planes(hidden: torch.Tensor, layout: TensorFormat) -> torch.Tensor:
    """Put the axes to transform last: [N, C, H, W] for images and frames, [B, C, S] for tokens."""
    if layout == "BCFHW":
        return hidden.permute(0, 2, 1, 3, 4).flatten(0, 1)
    if layout == "BFCHW":
        return hidden.flatten(0, 1)
    if layout == "BSC":
        return hidden.transpose(1, 2)
    return hidden


def _from_planes(planes: torch.Tensor, layout: TensorFormat, batch_size: int) -> torch.Tensor:
    if layout == "BCFHW":
        return planes.unflatten(0, (batch_size, -1)).permute(0, 2, 1, 3, 4)
    if layout == "BFCHW":
        return planes.unflatten(0, (batch_size, -1))
    if layout == "BSC":
        return planes.transpose(1, 2)
    return planes


@torch.no_grad()
def _split_low_high(planes: torch.Tensor, layout: TensorFormat) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "BSC":
        spectrum = torch.fft.fftshift(torch.fft.fft(planes), dim=-1)
        length = planes.shape[-1]
        positions = torch.arange(length, device=planes.device)
        low_mask = (positions - length // 2).abs() <= length // 5
    else:
        spectrum = torch.fft.fftshift(torch.fft.fft2(planes))
        height, width = planes.shape[-2:]
        radius = min(height, width) // 5
        y_grid, x_grid = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        low_mask = ((x_grid - width // 2) ** 2 + (y_grid - height // 2) ** 2 <= radius**2).to(planes.device)
    return spectrum * low_mask, spectrum * ~low_mask


def _inverse(spectrum: torch.Tensor, layout: TensorFormat) -> torch.Tensor:
    if layout == "BSC":
        return torch.fft.ifft(torch.fft.ifftshift(spectrum, dim=-1)).real
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum)).real


# -- output plumbing --------------------------------------------------------------------------------


def _hidden_of(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    return output[0]


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if torch.is_tensor(output):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output.sample = hidden
    return output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """Like ``_with_hidden`` but never mutates ``output`` (it may be another branch's result)."""
    if torch.is_tensor(output) or isinstance(output, tuple):
        return _with_hidden(output, hidden)
    return type(output)(sample=hidden)


def _cond_half(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.chunk(2, dim=0)[1]


# -- handlers ---------------------------------------------------------------------------------------


class _CallFlags:
    """Shared by the denoiser handler and the attention handlers of one session."""

    __slots__ = ("reduced",)

    def __init__(self) -> None:
        # None: batched CFG, where the attention handlers compare batch sizes as the reference does.
        self.reduced: bool | None = None


class _BatchedState:
    __slots__ = ("high_frequency_delta", "iteration", "low_frequency_delta")

    def __init__(self) -> None:
        self.iteration = 0
        self.low_frequency_delta: torch.Tensor | None = None
        self.high_frequency_delta: torch.Tensor | None = None


class _SeparateState:
    __slots__ = (
        "cond_output",
        "high_frequency_delta",
        "iteration",
        "low_frequency_delta",
        "skip_uncond",
        "uncond_since_cond",
    )

    def __init__(self) -> None:
        self.iteration = 0
        self.uncond_since_cond = False
        self.low_frequency_delta: torch.Tensor | None = None
        self.high_frequency_delta: torch.Tensor | None = None
        self.cond_output: Any = None
        self.skip_uncond = False


class _DenoiserHandler:
    def __init__(
        self,
        config: FasterCacheConfig,
        layout: TensorFormat,
        flags_key: object,
        extra_batched: tuple[str, ...],
        *,
        halve_by_batch: bool = False,
    ) -> None:
        self.config = config
        self.layout = layout
        self.batched_arguments = config._unconditional_conditional_input_kwargs_identifiers + extra_batched
        # A model outside the family table may carry the CFG batch in arguments of any name (CogView3-Plus'
        # size conditions): every tensor argument as long as the batch is halved with the latents.
        self.halve_by_batch = halve_by_batch
        self.flags_key = flags_key
        self.timestep = _call_timestep(timestep_reader(config.current_timestep_callback))
        self.low_weight, self.high_weight = _frequency_weights(config, self.timestep)

    def _should_skip_uncond(self, iteration: int, call: ModuleCall) -> bool:
        config = self.config
        low, high = config.unconditional_batch_timestep_skip_range
        timestep = self.timestep(call)
        return (
            iteration > 0
            and timestep is not None
            and low < timestep < high
            and iteration % config.unconditional_batch_skip_range != 0
            and not config.is_guidance_distilled
        )

    def __call__(self, call: ModuleCall) -> Any:
        flags = call.session.shared_state(self.flags_key, _CallFlags)
        if call.session.branch in _SEPARATE_BRANCHES and not self.config.is_guidance_distilled:
            return self._separate(call, flags)
        if not self.config.is_guidance_distilled and _leading_batch(call) % 2:
            # An odd batch cannot hold both CFG passes: the pipeline runs without CFG, so only the
            # attention part applies, as for a guidance-distilled model.
            flags.reduced = True
            return call.run()
        flags.reduced = None
        return self._batched(call)

    # Both passes in one batch: the reference's behaviour.
    def _batched(self, call: ModuleCall) -> Any:
        config = self.config
        state = call.session.state(self, _BatchedState)
        skip_uncond = self._should_skip_uncond(state.iteration, call)
        args, kwargs = call.args, call.kwargs
        if skip_uncond:
            identifiers = self.batched_arguments
            batch = _leading_batch(call)
            if any(name in identifiers for name in kwargs):
                args = tuple(_cond_half(arg) if torch.is_tensor(arg) else arg for arg in args)
                kwargs = {
                    k: _cond_half(v) if k in identifiers or self._carries_batch(v, batch) else v
                    for k, v in kwargs.items()
                }
        output = call.compute(*args, **kwargs)
        if config.is_guidance_distilled:
            state.iteration += 1
            return output
        hidden = _hidden_of(output)
        if skip_uncond:
            call.session.note_reuse()
            assert state.low_frequency_delta is not None and state.high_frequency_delta is not None
            state.low_frequency_delta = state.low_frequency_delta * self.low_weight(call)
            state.high_frequency_delta = state.high_frequency_delta * self.high_weight(call)
            uncond = self._rebuild_uncond(state, hidden)
            hidden = torch.cat([uncond, hidden], dim=0)
        else:
            uncond, cond = hidden.chunk(2, dim=0)
            self._record_deltas(state, uncond, cond)
        state.iteration += 1
        return _with_hidden(output, hidden)

    def _carries_batch(self, value: Any, batch: int) -> bool:
        return self.halve_by_batch and torch.is_tensor(value) and value.ndim > 0 and value.size(0) == batch

    # Cond and uncond as separate calls of the same step: skip the uncond call entirely.
    def _separate(self, call: ModuleCall, flags: _CallFlags) -> Any:
        state = call.session.shared_state(self, _SeparateState)
        if call.session.branch == "cond":
            state.skip_uncond = state.low_frequency_delta is not None and self._should_skip_uncond(
                state.iteration, call
            )
            # A cond pass that follows a cond pass: the pipeline runs without CFG, so attention may be
            # extrapolated on every call, as for a guidance-distilled model.
            no_cfg = state.iteration > 0 and not state.uncond_since_cond
            flags.reduced = state.skip_uncond or no_cfg
            state.uncond_since_cond = False
            output = call.run()
            state.cond_output = output
            state.iteration += 1
            return output
        flags.reduced = False
        state.uncond_since_cond = True
        cond_output, state.cond_output = state.cond_output, None
        if cond_output is None:
            # No cond pass earlier in this step to pair with: compute, and learn nothing from it.
            return call.run()
        cond = _hidden_of(cond_output)
        if state.skip_uncond:
            state.skip_uncond = False
            call.session.note_reuse()
            assert state.low_frequency_delta is not None and state.high_frequency_delta is not None
            state.low_frequency_delta = state.low_frequency_delta * self.low_weight(call)
            state.high_frequency_delta = state.high_frequency_delta * self.high_weight(call)
            return _replace_hidden(cond_output, self._rebuild_uncond(state, cond))
        output = call.run()
        self._record_deltas(state, _hidden_of(output), cond)
        return output

    def _record_deltas(
        self, state: _BatchedState | _SeparateState, uncond: torch.Tensor, cond: torch.Tensor
    ) -> None:
        layout = _format_of(cond, self.layout)
        low_uncond, high_uncond = _split_low_high(_to_planes(uncond, layout).float(), layout)
        low_cond, high_cond = _split_low_high(_to_planes(cond, layout).float(), layout)
        state.low_frequency_delta = low_uncond - low_cond
        state.high_frequency_delta = high_uncond - high_cond

    def _rebuild_uncond(self, state: _BatchedState | _SeparateState, cond: torch.Tensor) -> torch.Tensor:
        assert state.low_frequency_delta is not None and state.high_frequency_delta is not None
        layout = _format_of(cond, self.layout)
        low_cond, high_cond = _split_low_high(_to_planes(cond, layout).float(), layout)
        spectrum = (state.low_frequency_delta + low_cond) + (state.high_frequency_delta + high_cond)
        uncond = _from_planes(_inverse(spectrum, layout), layout, cond.size(0))
        return uncond.to(cond.dtype)


class _AttentionState:
    __slots__ = ("batch_size", "cache", "iteration")

    def __init__(self) -> None:
        self.iteration = 0
        self.batch_size: int | None = None
        self.cache: list[Any] | None = None


class _AttentionHandler:
    def __init__(
        self,
        config: FasterCacheConfig,
        block_skip_range: int,
        timestep_skip_range: tuple[float, float],
        flags_key: object,
    ) -> None:
        self.is_guidance_distilled = config.is_guidance_distilled
        self.block_skip_range = block_skip_range
        self.low, self.high = timestep_skip_range
        self.flags_key = flags_key
        self.timestep = _call_timestep(timestep_reader(config.current_timestep_callback))
        callback = config.attention_weight_callback
        self.weight: Callable[[nn.Module], float] = callback if callback is not None else (lambda _: 0.5)

    def __call__(self, call: ModuleCall) -> Any:
        state = call.session.state(self, _AttentionState)
        # None: batched CFG, where a call is reduced when its batch shrank, as the reference tests it.
        reduced = call.session.shared_state(self.flags_key, _CallFlags).reduced
        batched = reduced is None
        batch_size = _first_batch_size(call)
        if state.batch_size is None:
            state.batch_size = batch_size
        timestep = self.timestep(call)
        if timestep is None or not self.low < timestep < self.high:
            skip = False
        else:
            skip = not (state.iteration > 0 and state.iteration % self.block_skip_range == 0)
        if skip:
            skip = self.is_guidance_distilled or (
                state.batch_size != batch_size if batched else bool(reduced)
            )
        # Nothing cached yet (a skip window holding the first step): compute. The reference fails here.
        skip = skip and state.cache is not None
        if skip:
            assert state.cache is not None
            weight = self.weight(call.module)
            before, last = state.cache
            output: Any
            if torch.is_tensor(last):
                output = _extrapolate(before, last, weight, batch_size)
            else:
                output = tuple(
                    _extrapolate(b, t, weight, batch_size) for b, t in zip(before, last, strict=True)
                )
        else:
            output = call.run()
        halve = batched and not self.is_guidance_distilled
        if torch.is_tensor(output):
            cached: Any = _cond_half(output) if halve and output.size(0) == state.batch_size else output
        else:
            cached = tuple(
                _cond_half(part) if halve and part.size(0) == state.batch_size else part for part in output
            )
        state.cache = [cached, cached] if state.cache is None else [state.cache[-1], cached]
        state.iteration += 1
        return output


def _leading_batch(call: ModuleCall) -> int:
    hidden = call.kwargs.get("hidden_states", call.args[0] if call.args else None)
    return int(hidden.size(0)) if torch.is_tensor(hidden) else 0


def _first_batch_size(call: ModuleCall) -> int:
    for value in (*call.args, *call.kwargs.values()):
        if torch.is_tensor(value):
            return int(value.size(0))
    raise ValueError("faster_cache: attention call without tensor arguments")


def _extrapolate(before: torch.Tensor, last: torch.Tensor, weight: float, batch_size: int) -> torch.Tensor:
    if before.size(0) != batch_size:
        before = before[batch_size:]
    if last.size(0) != batch_size:
        last = last[batch_size:]
    return last + (last - before) * weight


def _call_timestep(reader: Callable[[CacheSession], Any]) -> Callable[[ModuleCall], Any]:
    return lambda call: reader(call.session)


def _frequency_weights(
    config: FasterCacheConfig, timestep: Callable[[ModuleCall], Any]
) -> tuple[Callable[[ModuleCall], float], Callable[[ModuleCall], float]]:
    def default(window: tuple[float, float], alpha: float) -> Callable[[ModuleCall], float]:
        def weight(call: ModuleCall) -> float:
            value = timestep(call)
            return alpha if value is not None and window[0] < value < window[1] else 1.0

        return weight

    def from_callback(callback: Callable[[nn.Module], float]) -> Callable[[ModuleCall], float]:
        return lambda call: callback(call.module)

    low = (
        from_callback(config.low_frequency_weight_callback)
        if config.low_frequency_weight_callback is not None
        else default(config.low_frequency_weight_update_timestep_range, config.alpha_low_frequency)
    )
    high = (
        from_callback(config.high_frequency_weight_callback)
        if config.high_frequency_weight_callback is not None
        else default(config.high_frequency_weight_update_timestep_range, config.alpha_high_frequency)
    )
    return low, high


_DEFAULT_SPATIAL_IDENTIFIERS = FasterCacheConfig().spatial_attention_block_identifiers


def plan(config: FasterCacheConfig, layout: ModelLayout) -> Plan:
    if layout.family.cfg_batch_problem is not None and not config.is_guidance_distilled:
        raise UnsupportedMethodError(NAME, layout, layout.family.cfg_batch_problem)
    if layout.family.latents_per_sample and not config.is_guidance_distilled:
        raise UnsupportedMethodError(
            NAME,
            layout,
            "its denoiser takes the latents as a list of samples, and FasterCache splits a batch of both CFG "
            "passes in halves",
        )
    tensor_format: TensorFormat = (
        config.tensor_format if layout.family is GENERIC_FAMILY else layout.family.output_format  # type: ignore[assignment]
    )
    flags_key = object()
    handlers: dict[nn.Module, Handler] = {
        layout.denoiser: _DenoiserHandler(
            config,
            tensor_format,
            flags_key,
            layout.family.cfg_batched_arguments,
            halve_by_batch=True,
        )
    }
    attention_count = 0
    for site in layout.attention:
        if site.kind == "cross" or not check.search_any(_ATTENTION_PATTERNS, site.name):
            continue
        if check.search_any(config.spatial_attention_block_identifiers, site.name):
            skip_range, window = (
                config.spatial_attention_block_skip_range,
                config.spatial_attention_timestep_skip_range,
            )
        elif config.temporal_attention_block_skip_range is not None and check.search_any(
            config.temporal_attention_block_identifiers, site.name
        ):
            skip_range = config.temporal_attention_block_skip_range
            window = config.temporal_attention_timestep_skip_range
        else:
            continue
        handlers[site.module] = _AttentionHandler(config, skip_range, window, flags_key)
        attention_count += 1
    if attention_count == 0 and config.spatial_attention_block_identifiers == _DEFAULT_SPATIAL_IDENTIFIERS:
        # The reference's names match no block list here (Lumina 2's ``layers``): the table's blocks
        # hold the spatial attention instead.
        prefixes = tuple(f"{name}." for name in layout.block_names)
        for site in layout.attention:
            if site.kind != "cross" and site.name.startswith(prefixes):
                handlers[site.module] = _AttentionHandler(
                    config,
                    config.spatial_attention_block_skip_range,
                    config.spatial_attention_timestep_skip_range,
                    flags_key,
                )
                attention_count += 1
    if attention_count == 0 and config.is_guidance_distilled:
        raise UnsupportedMethodError(
            NAME,
            layout,
            "no attention module matches the identifiers, and a guidance-distilled model has no CFG pass",
        )
    return Plan(method=NAME, handlers=handlers)
