"""Mechanism: wrap a module's ``forward`` with a dispatcher, and take it off again.

Nothing about caching lives here. A dispatcher receives the module, the forward it replaced and
the call's arguments, and decides what to return.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import TracebackType
from typing import Any

from torch import nn

Forward = Callable[..., Any]
Dispatch = Callable[[nn.Module, Forward, tuple[Any, ...], dict[str, Any]], Any]

_HANDLE_ATTR = "_cache_engine_dispatch_handle"
_UNDISPATCHED_ATTR = "_cache_engine_undispatched_forward"


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


def offer_undispatched_forward(module: nn.Module, forward: Forward) -> None:
    """Give ``module`` a second forward computing the same with no dispatcher inside it (a block compiled
    whole, its attention traced into the block's graph rather than called through its dispatcher).

    An engine installed afterwards calls it for a call whose policy acts on nothing inside ``module``,
    and counts what the bypassed dispatchers would have counted. A dispatcher inside a compiled block is
    a graph break; a policy that acts only on whole blocks (or on nothing) need not pay for it.
    """
    module.__dict__[_UNDISPATCHED_ATTR] = forward


def undispatched_forward(module: nn.Module) -> Forward | None:
    found = module.__dict__.get(_UNDISPATCHED_ATTR)
    return found if callable(found) else None
