"""CacheEngine: dispatchers installed once on a resident transformer, a policy per session."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from torch import nn

from . import methods
from .batching import merged_calls
from .hooks import (
    DispatchHandle,
    install_dispatcher,
    installed_handle,
    undispatched_forward,
    undispatched_taps,
)
from .session import (
    CacheSession,
    Plan,
    Role,
    UndispatchedBlock,
    active_session,
    bound,
    branch,
    dispatch_in_merged,
)
from .targets import ModelLayout, build_layout

_ENGINE_ATTR = "_cache_engine"


class CacheEngine:
    """Caching for one transformer, with the policy chosen per session.

    The constructor installs pass-through dispatchers on the denoiser, its blocks and its attention
    modules. ``with engine.session(config):`` runs one generation under ``config``; all state lives in
    that session and is dropped when it ends. Another config on the next session installs nothing,
    except dispatchers on modules no earlier policy touched (custom TaylorSeer identifiers).
    """

    def __init__(self, transformer: nn.Module) -> None:
        if engine_of(transformer) is not None:
            raise ValueError("this transformer already has a CacheEngine; use cache_engine.engine_of()")
        self.layout: ModelLayout = build_layout(transformer)
        self.transformer = transformer
        self._lock = threading.Lock()
        self._handles: dict[nn.Module, DispatchHandle] = {}
        self._ambient: CacheSession | None = None
        self._patched: dict[str, Any] = {}

        self._undispatched = self._offered_forwards()
        self._install(transformer, Role.DENOISER)
        for block in self.layout.blocks:
            self._install(block.module, Role.BLOCK)
        for site in self.layout.attention:
            self._install(site.module, Role.ATTENTION)
        self._patch_pipeline_protocol()
        transformer.__dict__[_ENGINE_ATTR] = self

    # -- what the model supports ------------------------------------------------------------------

    @property
    def family(self) -> str:
        return self.layout.family.name

    @property
    def supported_methods(self) -> tuple[str, ...]:
        return methods.supported_methods(self.layout)

    def fitted_defaults(self, method: str) -> dict[str, Any]:
        """The fields of ``method`` whose reference default cannot act on this model, with the values a
        config should take here instead: DBCache's front blocks on a model of eight blocks or fewer."""
        return methods.fitted_defaults(method, self.layout)

    def plan(self, config: object | None) -> Plan:
        """The handlers ``config`` puts on this model; raises ValueError if it cannot apply here."""
        if config is None:
            return Plan.empty()
        return methods.plan_for(config, self.layout)

    def check(self, config: object | None) -> None:
        self.plan(config)

    # -- sessions ---------------------------------------------------------------------------------

    @contextmanager
    def session(
        self, config: object | None, *, request_id: str | None = None, whole_blocks: bool = True
    ) -> Iterator[CacheSession]:
        """Run the code inside under ``config``, with state that belongs to this session only.

        ``whole_blocks=False`` runs every block through the dispatchers inside it even where the policy
        acts on nothing there, instead of the block's offered undispatched forward: warming up a
        compiled model compiles both forms of each block."""
        plan = self.plan(config)
        self._ensure_installed(plan)
        offers = self._undispatched if whole_blocks else None
        session = CacheSession(self, self.layout, plan, config, request_id, offers)
        with bound(session):
            yield session

    # -- the reference API's single, model-wide policy -------------------------------------------

    @property
    def ambient_config(self) -> object | None:
        return None if self._ambient is None else self._ambient.config

    def enable(self, config: object) -> None:
        """Apply ``config`` to every call made outside a session (the reference API's behaviour)."""
        if self._ambient is not None:
            raise ValueError(
                f"caching is already enabled with {type(self._ambient.config).__name__}; disable it first"
            )
        plan = self.plan(config)
        self._ensure_installed(plan)
        self._ambient = CacheSession(self, self.layout, plan, config, undispatched=self._undispatched)

    def disable(self) -> None:
        self._ambient = None

    def reset_ambient_state(self) -> None:
        if self._ambient is not None:
            self._ambient.reset()

    # -- teardown ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every dispatcher and patch; the transformer is as it was before the engine."""
        with self._lock:
            for handle in self._handles.values():
                handle.remove()
            self._handles.clear()
            for name, original in self._patched.items():
                if original is None:
                    self.transformer.__dict__.pop(name, None)
                else:
                    self.transformer.__dict__[name] = original
            self._patched.clear()
            self.transformer.__dict__.pop(_ENGINE_ATTR, None)
            self._ambient = None

    # -- internals --------------------------------------------------------------------------------

    def _dispatcher(
        self, role: Role
    ) -> Callable[[nn.Module, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]:
        def dispatch(
            module: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> Any:
            merged = merged_calls()
            if merged is not None:
                return dispatch_in_merged(self, merged, role, module, forward, args, kwargs)
            session = active_session(self)
            if session is None:
                session = self._ambient
                if session is None:
                    offered = self._undispatched.get(module) if role is Role.BLOCK else None
                    return (forward if offered is None else offered.call)(*args, **kwargs)
            return session.dispatch(role, module, forward, args, kwargs)

        return dispatch

    def _offered_forwards(self) -> dict[nn.Module, UndispatchedBlock]:
        """The blocks offering a forward with no dispatcher inside, with what a session needs to use it."""
        offers = {}
        attention = {site.module for site in self.layout.attention}
        for site in self.layout.blocks:
            forward = undispatched_forward(site.module)
            if forward is None:
                continue
            inside = frozenset(module for module in site.module.modules() if module is not site.module)
            taps = {module: tap for module, tap in undispatched_taps(site.module).items() if module in inside}
            offers[site.module] = UndispatchedBlock(forward, inside, len(inside & attention), taps)
        return offers

    def _install(self, module: nn.Module, role: Role) -> None:
        if module in self._handles or installed_handle(module) is not None:
            return
        self._handles[module] = install_dispatcher(module, self._dispatcher(role))

    def _ensure_installed(self, plan: Plan) -> None:
        missing = [module for module in plan.handlers if module not in self._handles]
        if not missing:
            return
        with self._lock:
            for module in missing:
                self._install(module, Role.OTHER)

    def _patch_pipeline_protocol(self) -> None:
        """Route the pipeline's ``cache_context(name)`` into our branch, and its end-of-call reset."""
        transformer = self.transformer
        original_context = getattr(transformer, "cache_context", None)
        original_reset = getattr(transformer, "_reset_stateful_cache", None)

        @contextmanager
        def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
            inner: AbstractContextManager[Any] = (
                original_context(name, **kwargs) if original_context is not None else nullcontext()
            )
            with branch(name, kwargs), inner:
                yield

        def _reset_stateful_cache(recurse: bool = True) -> None:
            if original_reset is not None:
                original_reset(recurse=recurse)
            self.reset_ambient_state()

        for name, replacement in (
            ("cache_context", cache_context),
            ("_reset_stateful_cache", _reset_stateful_cache),
        ):
            self._patched[name] = transformer.__dict__.get(name)
            transformer.__dict__[name] = replacement


def engine_of(transformer: nn.Module) -> CacheEngine | None:
    found = transformer.__dict__.get(_ENGINE_ATTR)
    return found if isinstance(found, CacheEngine) else None
