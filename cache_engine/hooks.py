"""Mechanism: wrap a module's ``forward`` with a dispatcher, and take it off again.

Nothing about caching lives here. A dispatcher receives the module, the forward it replaced and
the call's arguments, and decides what to return.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from torch import nn

Forward = Callable[..., Any]
Dispatch = Callable[[nn.Module, Forward, tuple[Any, ...], dict[str, Any]], Any]

_HANDLE_ATTR = "_cache_engine_dispatch_handle"
_UNDISPATCHED_ATTR = "_cache_engine_undispatched_forward"
_TAPS_ATTR = "_cache_engine_undispatched_taps"


class DispatchHandle:
    """A removable, idempotent handle on one installed dispatcher; also a context manager."""

    def __init__(self, module: nn.Module, replaced: Forward, had_instance_forward: bool) -> None:
        self.module = module
        self.replaced = replaced
        self._had_instance_forward = had_instance_forward
        self._removed = False

    @property
    def removed(self) -> bool:
        return self._removed

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        if self._had_instance_forward:
            self.module.forward = self.replaced
        else:
            # The class's own forward comes back through attribute lookup once the instance one is gone.
            self.module.__dict__.pop("forward", None)
        self.module.__dict__.pop(_HANDLE_ATTR, None)

    def __enter__(self) -> DispatchHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def installed_handle(module: nn.Module) -> DispatchHandle | None:
    handle = module.__dict__.get(_HANDLE_ATTR)
    return handle if isinstance(handle, DispatchHandle) and not handle.removed else None


def install_dispatcher(module: nn.Module, dispatch: Dispatch) -> DispatchHandle:
    """Route every call of ``module.forward`` through ``dispatch``.

    Installing twice on the same module is refused: two dispatchers stacked on one module would each
    count and decide, and the second would see the first as the real forward.
    """
    if installed_handle(module) is not None:
        raise ValueError(f"a dispatcher is already installed on {type(module).__name__}")
    had_instance_forward = "forward" in module.__dict__
    replaced: Forward = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return dispatch(module, replaced, args, kwargs)

    # Keep the wrapped signature so inspect.signature and export tools see the real parameters.
    functools.update_wrapper(forward, replaced)
    module.forward = forward
    handle = DispatchHandle(module, replaced, had_instance_forward)
    module.__dict__[_HANDLE_ATTR] = handle
    return handle


class Tap:
    """A slot at one module inside an undispatched forward, for a policy that acts on that module.

    The forward uses ``replay`` as the module's output instead of running it (it runs it when
    ``replay`` is None), and leaves in ``output`` what the module gave. The slot is shared by every
    caller of the forward: whoever sets or reads it holds the block's lock until the call is over,
    and clears it then.
    """

    __slots__ = ("output", "replay")

    def __init__(self) -> None:
        self.replay: Any = None
        self.output: Any = None

    def clear(self) -> None:
        self.replay = None
        self.output = None


def install_tap(module: nn.Module, tap: Tap) -> None:
    """Route ``module``'s calls through ``tap``; for a module inside an undispatched forward (a copy of
    a block's module, never the real one, which carries the dispatcher)."""
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        # Read while tracing, in a compiled block: run and replay are two graphs of it.
        output = original(*args, **kwargs) if tap.replay is None else tap.replay
        tap.output = output
        return output

    module.forward = forward


def offer_undispatched_forward(
    module: nn.Module, forward: Forward, taps: Mapping[nn.Module, Tap] | None = None
) -> None:
    """Give ``module`` a second forward computing the same with no dispatcher inside it (a block compiled
    whole, its attention traced into the block's graph rather than called through its dispatcher).

    An engine installed afterwards calls it for a call whose policy acts on nothing inside ``module``,
    and counts what the bypassed dispatchers would have counted. A dispatcher inside a compiled block is
    a graph break; a policy that acts only on whole blocks (or on nothing) need not pay for it.

    ``taps`` maps modules inside ``module`` to their slots in ``forward``: a policy acting only on those
    modules, whose handlers can decide before the block runs, runs ``forward`` too, deciding beforehand
    and being told the outputs afterwards.
    """
    module.__dict__[_UNDISPATCHED_ATTR] = forward
    module.__dict__[_TAPS_ATTR] = dict(taps or {})


def undispatched_forward(module: nn.Module) -> Forward | None:
    found = module.__dict__.get(_UNDISPATCHED_ATTR)
    return found if callable(found) else None


def undispatched_taps(module: nn.Module) -> dict[nn.Module, Tap]:
    found = module.__dict__.get(_TAPS_ATTR)
    return dict(found) if isinstance(found, dict) else {}
