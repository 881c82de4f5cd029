"""Load-time speed and memory knobs for a resident pipeline's transformers, composable with every cache
policy: compiled blocks, quantized weights and an attention backend.

Compilation is regional, like diffusers' ``compile_repeated_blocks``, but placed *under* the cache
engine's dispatchers. Each transformer block's and attention module's own forward is compiled before
the engine wraps it, so a block a policy skips is simply not called, and the dispatchers, whose Python
decisions differ per request, never enter a graph. Each block is compiled in two forms:

- whole, its attention traced into the block's graph, each attention module with a slot
  (``cache_engine.hooks.Tap``) through which a policy can replay its output. The engine runs this form
  for every policy that acts on nothing inside the block (no cache, and the methods that skip whole
  blocks) and for those whose attention handlers decide before the block runs (PAB, TaylorSeer on
  attention): run and replay of each attention module are graphs of their own, a replayed tensor an
  input;
- as it is, for a policy acting on attention per call (FasterCache): the dispatchers on modules inside
  the block are excluded from tracing (:func:`seal`), which splits the block's graph around them, so
  those dispatchers decide in plain Python between the pieces.

Tensor views are handed across graph boundaries as plain tensors, because Dynamo guards on whether an
input is a view, and a cached output (a fresh tensor) would otherwise recompile the graph that a
computed output (a view) compiled. Shapes become dynamic after the second size seen; the server warms
each model at two sizes in both forms, and under policies replaying its attention in every combination
(``server.runtime.warm_up``), before it is ready (``server.runtime.loading``), after which sizes and policies
compile nothing more.

Quantization uses torchao (``pip install 'ditcache[quantize]'``): int8 weight-only anywhere, fp8 where
the device has it. The attention backend is diffusers' dispatcher (``native``, ``flash``, ``sage``,
...), checked at load by running it once on the model's device and dtype.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from server.ops.dtypes import dtype_name

if TYPE_CHECKING:
    from cache_engine.hooks import Tap

__all__ = [
    "QUANTIZATIONS",
    "Acceleration",
    "AccelerationError",
    "CompileClock",
    "apply",
    "compiled_frames",
    "is_compiled",
    "seal",
    "weight_bytes",
]

logger = logging.getLogger(__name__)

Quantization = Literal["none", "int8", "fp8"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "int8", "fp8")

# Set on a module whose forward this module compiled: the compiled function and the forward it replaced.
_COMPILED_ATTR = "_ditcache_compiled_forward"
# Each compiled forward is cached per code object, shared by every block of a class and by every model
# of a family in the process; each model and shape regime adds entries, past Dynamo's default of 8.
_RECOMPILE_LIMIT = 64
# Per block class: its forward on a code object of its own, for the block compiled whole.
_WHOLE_FORWARDS: dict[type[nn.Module], Callable[..., Any]] = {}


class AccelerationError(ValueError):
    """A knob this machine or this model cannot honour; raised at load, before anything is served."""


@dataclass(frozen=True)
class Acceleration:
    """What to do to a pipeline's transformers at load.

    ``compile_backend`` is torch.compile's backend; the tests use ``eager`` (Dynamo's tracing, graph
    breaks and guards, without code generation), where inductor's C++ build takes minutes on a small CPU.
    """

    compile: bool = False
    quantize: Quantization = "none"
    attention_backend: str | None = None
    compile_backend: str = "inductor"
    compile_mode: str | None = None

    @property
    def active(self) -> bool:
        return self.compile or self.quantize != "none" or self.attention_backend is not None


def apply(
    transformers: Iterable[nn.Module],
    blocks: Callable[[nn.Module], Iterable[nn.Module]],
    attention: Callable[[nn.Module], Iterable[nn.Module]],
    acceleration: Acceleration,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> None:
    """Apply ``acceleration`` to each transformer, before any cache engine is installed on it.

    ``blocks`` and ``attention`` name a transformer's repeated blocks and attention modules (the cache
    engine's model table knows them). After the engines are installed, call :func:`seal`.
    """
    if acceleration.attention_backend is not None:
        check_attention_backend(acceleration.attention_backend, device=device, dtype=dtype)
    for transformer in transformers:
        if acceleration.attention_backend is not None:
            _set_attention_backend(transformer, acceleration.attention_backend)
        if acceleration.quantize != "none":
            quantize(transformer, acceleration.quantize, device=device)
        if acceleration.compile:
            compile_blocks(
                blocks(transformer),
                attention(transformer),
                backend=acceleration.compile_backend,
                mode=acceleration.compile_mode,
            )


# -- attention backends ---------------------------------------------------------------------------------


def check_attention_backend(name: str, *, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise AccelerationError unless diffusers' attention backend ``name`` runs here.

    diffusers checks only that a backend's package is installed; a backend that needs a GPU it does not
    have (flash on a CPU) or a dtype it does not take (flash in float32) fails at the first request. One
    small attention call on the model's device and dtype finds that out at load instead.
    """
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
        dispatch_attention_fn,
    )

    names = sorted(member.value for member in AttentionBackendName if not member.value.startswith("_"))
    try:
        backend = AttentionBackendName(name.lower())
    except ValueError:
        raise AccelerationError(
            f"unknown attention backend {name!r}; diffusers has: {', '.join(names)}"
        ) from None
    try:
        _check_attention_backend_requirements(backend)
        # diffusers' layout: (batch, tokens, heads, head_dim).
        query = torch.randn(1, 16, 2, 64, device=device, dtype=dtype)
        dispatch_attention_fn(query, query, query, backend=backend)
    except Exception as exc:
        raise AccelerationError(
            f"attention backend {backend.value!r} cannot run on {device} in {dtype_name(dtype)}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _set_attention_backend(transformer: nn.Module, name: str) -> None:
    setter = getattr(transformer, "set_attention_backend", None)
    if setter is None:
        raise AccelerationError(
            f"{type(transformer).__name__} has no set_attention_backend; --attention-backend needs a "
            "diffusers model"
        )
    setter(name)
    dispatched = sum(
        hasattr(getattr(module, "processor", None), "_attention_backend") for module in transformer.modules()
    )
    if not dispatched:
        # Older attention processors call torch's SDPA directly; the backend changes nothing there.
        logger.warning(
            "attention backend %s: no attention module of %s goes through diffusers' dispatcher; "
            "it runs torch's scaled_dot_product_attention",
            name,
            type(transformer).__name__,
        )


# -- quantization -----------------------------------------------------------------------------------------


def quantize(transformer: nn.Module, mode: Quantization, *, device: torch.device | str) -> None:
    """Quantize the transformer's linear layers in place with torchao."""
    try:
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise AccelerationError(
            f"--quantize {mode} needs torchao: pip install 'ditcache[quantize]' ({exc})"
        ) from exc
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config: Any = Int8WeightOnlyConfig()
    elif mode == "fp8":
        _check_fp8(device)
        from torchao.quantization import Float8WeightOnlyConfig

        config = Float8WeightOnlyConfig()
    else:
        raise AccelerationError(f"unknown quantization {mode!r}; expected one of {', '.join(QUANTIZATIONS)}")
    quantize_(transformer, config)


def _check_fp8(device: torch.device | str) -> None:
    where = torch.device(device)
    if where.type != "cuda" or not torch.cuda.is_available():
        raise AccelerationError(
            f"--quantize fp8 needs a CUDA device with fp8 support; this model is on {where}"
        )
    capability = torch.cuda.get_device_capability(where)
    if capability < (8, 9):
        raise AccelerationError(
            f"--quantize fp8 needs compute capability 8.9 or newer (Ada, Hopper); {where} has "
            f"{capability[0]}.{capability[1]}; use --quantize int8"
        )


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored, quantized ones included.

    A quantized weight is a tensor subclass whose own size is the logical one; its bytes are those of
    the plain tensors it is made of (int8 data, scales, zero points). Shared tensors count once.
    """
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


# -- regional compilation ---------------------------------------------------------------------------------


def compile_blocks(
    blocks: Iterable[nn.Module],
    attention: Iterable[nn.Module] = (),
    *,
    backend: str = "inductor",
    mode: str | None = None,
) -> None:
    """Compile each block twice, and each attention module's own forward; keep the forwards replaced.

    A block's forward becomes the block compiled as it is, in which each attention call is a graph
    break once the engine's dispatchers are sealed (what a policy acting on attention needs), and the
    block is also offered to the engine compiled whole, attention included, with a slot on each
    attention module (``cache_engine.hooks.offer_undispatched_forward``), which the engine runs for
    every policy that acts on nothing inside the block (no cache, or any method that skips whole
    blocks), or on its attention only through handlers that decide ahead (PAB, TaylorSeer).

    Compiled per module but cached per code object: every block of one class shares its graphs, as
    with diffusers' ``compile_repeated_blocks``.
    """
    import torch._dynamo

    from cache_engine.hooks import offer_undispatched_forward

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    attention = list(attention)
    tapped = set(attention)
    for block in blocks:
        if is_compiled(block):
            continue
        if any("forward" in module.__dict__ for module in block.modules()):
            # Someone's wrapper (an offload hook) is bound to the real modules: a copy would call
            # through it, dispatchers included. The block runs as it is, split, for every policy.
            logger.warning(
                "%s has a forward set on it: compiled with its dispatchers only", type(block).__name__
            )
            _compile_forward(block, backend=backend, mode=mode)
            continue
        # Taken before anything is installed inside the block: its modules as they are, sharing the
        # block's parameters, with no dispatcher that a later engine puts on the real ones.
        shadow = _shadow(block)
        taps = _tap(block, shadow, tapped)
        whole = types.MethodType(_whole_forward(type(block)), shadow)
        _compile_forward(block, backend=backend, mode=mode)
        compiled = torch.compile(whole, backend=backend, mode=mode)
        offer_undispatched_forward(block, _tapped_entry(compiled, tuple(taps.values())), taps)
    for module in attention:
        if not is_compiled(module):
            _compile_forward(module, backend=backend, mode=mode)


def _compile_forward(module: nn.Module, *, backend: str, mode: str | None) -> None:
    original = module.forward
    compiled = torch.compile(original, backend=backend, mode=mode)
    # A plain function, not torch.compile's wrapper: the engine's dispatcher copies the attributes of
    # the forward it wraps, and Dynamo, finding the compiled wrapper's markers on the dispatcher,
    # would inline the original forward and skip the dispatcher altogether.
    forward = _entry(compiled)
    functools.update_wrapper(forward, original)
    module.forward = forward
    module.__dict__[_COMPILED_ATTR] = (compiled, original)


def _entry(compiled: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return _plain(compiled(*_plain(args), **{name: _plain(value) for name, value in kwargs.items()}))

    return forward


def _tapped_entry(compiled: Callable[..., Any], taps: tuple[Tap, ...]) -> Callable[..., Any]:
    entry = _entry(compiled)
    if not taps:
        return entry

    def forward(*args: Any, **kwargs: Any) -> Any:
        for tap in taps:
            if tap.replay is not None:
                # Outputs replayed are outputs a graph gave (views among them) or fresh predictions:
                # one layout for all, so that no guard tells them apart.
                tap.replay = _contiguous(tap.replay)
        return entry(*args, **kwargs)

    return forward


def _contiguous(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _plain(value.contiguous())
    if type(value) is tuple:
        return tuple(_contiguous(item) for item in value)
    return value


def _tap(block: nn.Module, shadow: nn.Module, modules: set[nn.Module]) -> dict[nn.Module, Tap]:
    """A slot on each of ``modules`` inside ``block``, installed on its counterpart in ``shadow``."""
    from cache_engine.hooks import Tap, install_tap

    taps: dict[nn.Module, Tap] = {}
    for name, module in block.named_modules():
        if module in modules and module is not block:
            taps[module] = tap = Tap()
            install_tap(shadow.get_submodule(name), tap)
    return taps


def _whole_forward(cls: type[nn.Module]) -> Callable[..., Any]:
    """``cls.forward`` on a code object of its own, one per class.

    Dynamo keeps compiled entries per code object and takes the first whose guards pass; they do not
    tell a block from its shadow, so on the class's own code a whole call could run the split form's
    graphs (and their breaks). On its own code, the whole form has entries of its own; one per class
    keeps every block of a class on one graph, as the split form is.
    """
    found = _WHOLE_FORWARDS.get(cls)
    if found is None:
        forward = cls.forward
        if not isinstance(forward, types.FunctionType):
            # Nothing to copy (a forward that is no Python function): the form shares its code.
            return forward
        found = types.FunctionType(
            forward.__code__.replace(co_name=f"{forward.__name__}_whole"),
            forward.__globals__,
            f"{forward.__name__}_whole",
            forward.__defaults__,
            forward.__closure__,
        )
        found.__kwdefaults__ = forward.__kwdefaults__
        _WHOLE_FORWARDS[cls] = found
    return found


def _shadow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` and of every module inside it that shares their parameters and buffers
    (the same dicts) but not their attributes: a dispatcher later set on a real module is not on its
    shadow."""
    shadow = copy.copy(module)
    shadow._modules = {
        name: None if child is None else _shadow(child) for name, child in module._modules.items()
    }
    return shadow


def is_compiled(module: nn.Module) -> bool:
    return _COMPILED_ATTR in module.__dict__


def seal(transformer: nn.Module) -> int:
    """Keep Dynamo out of every dispatcher installed inside a compiled module; returns how many.

    A compiled block that calls a module with a dispatcher (its attention) would otherwise trace the
    dispatcher and the session behind it, and guard on the request's policy. Excluded, the call is a
    graph break: the block's graph runs up to it, the dispatcher decides in plain Python (and may call
    the module's own compiled forward), and the rest of the block runs as a second graph.
    """
    from cache_engine.hooks import installed_handle

    sealed = 0
    for outer in transformer.modules():
        if not is_compiled(outer):
            continue
        for module in outer.modules():
            if module is outer or installed_handle(module) is None:
                continue
            if getattr(module.forward, "_ditcache_sealed", False):
                continue
            excluded = torch.compiler.disable(module.forward, recursive=True)
            excluded._ditcache_sealed = True
            module.forward = excluded
            sealed += 1
    return sealed


def _plain(value: Any) -> Any:
    """``value`` with tensor views replaced by plain tensors on the same memory (no copy).

    Dynamo guards on an input's view base; a view and a fresh tensor of the same shape then need two
    graphs. Inference only: a view that needs a gradient is left as it is.
    """
    if isinstance(value, torch.Tensor):
        return value.detach() if value._base is not None and not value.requires_grad else value
    if type(value) is tuple:
        return tuple(_plain(item) for item in value)
    if type(value) is list:
        return [_plain(item) for item in value]
    return value


# -- counting compilations --------------------------------------------------------------------------------


def compiled_frames() -> int:
    """Frames Dynamo has compiled in this process so far, first compilations and recompilations alike."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


@dataclass
class CompileClock:
    """Wall time and frames compiled during a block of code (a warm-up)."""

    seconds: float = 0.0
    frames: int = 0

    @contextmanager
    def measure(self) -> Iterator[CompileClock]:
        start, frames = time.perf_counter(), compiled_frames()
        try:
            yield self
        finally:
            self.seconds += time.perf_counter() - start
            self.frames += compiled_frames() - frames
