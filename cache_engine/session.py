"""Session: everything one request's caching needs, owned by that request alone.

A :class:`CacheSession` holds the request's policy (a plan of handlers), its state keyed by
``(owner, branch)``, its counters and its stats. It is bound through a ``ContextVar``, so each
thread or task sees only its own session; with none bound, every dispatcher is a pass-through.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from .batching import (
    BatchMember,
    MergedCall,
    current_member,
    join_rows,
    leading_rows,
    run_for_rows,
    split_rows,
    take_rows,
)
from .hooks import Tap
from .targets import ModelLayout, scalar_timestep

DEFAULT_BRANCH = "default"

# The sessions bound in this thread or task, innermost last: one per engine, so that a pipeline with
# two transformers (Wan 2.2's experts) runs both under one request's policy.
_ACTIVE_SESSIONS: ContextVar[tuple[CacheSession, ...]] = ContextVar("cache_engine_sessions", default=())
_BRANCH: ContextVar[str | None] = ContextVar("cache_engine_branch", default=None)
# Where the denoising loop is, as the pipeline tells its ``cache_context`` (Wan: step_index, sigma,
# num_inference_steps); empty where it tells nothing.
_LOOP_POSITION: ContextVar[Mapping[str, Any]] = ContextVar(
    "cache_engine_loop_position", default=MappingProxyType({})
)

S = TypeVar("S")


class Role(enum.Enum):
    DENOISER = "denoiser"
    BLOCK = "block"
    ATTENTION = "attention"
    OTHER = "other"


class ModuleCall:
    """One intercepted forward call, handed to a method's handler."""

    __slots__ = ("args", "computed", "forward", "kwargs", "module", "session")

    def __init__(
        self,
        session: CacheSession,
        module: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.session = session
        self.module = module
        self.forward = forward
        self.args = args
        self.kwargs = kwargs
        self.computed = False

    def compute(self, *args: Any, **kwargs: Any) -> Any:
        """Run the real forward with the given arguments (the handler may have changed them)."""
        self.computed = True
        return self.forward(*args, **kwargs)

    def run(self) -> Any:
        """Run the real forward with the call's own arguments."""
        return self.compute(*self.args, **self.kwargs)


class Handler(Protocol):
    def __call__(self, call: ModuleCall) -> Any: ...


@runtime_checkable
class ForeseeingHandler(Protocol):
    """A handler whose decision needs the session and the module, not the call's arguments: it can
    decide before a block runs its module inside a compiled graph, and be told the output after.

    ``decide`` returns the output to use instead of running the module, or None to run it; ``record``
    then receives the output used, computed or not. Calling the handler does both around the call.
    """

    def __call__(self, call: ModuleCall) -> Any: ...

    def decide(self, session: CacheSession, module: nn.Module) -> Any: ...

    def record(self, session: CacheSession, module: nn.Module, output: Any, computed: bool) -> None: ...


@dataclass(frozen=True)
class Plan:
    """What one method does on one model: a handler per module it acts on."""

    method: str | None
    handlers: Mapping[nn.Module, Handler]
    # For a method that estimates its own error (guarded TaylorSeer): the session's estimate so far.
    estimate: Callable[[CacheSession], float] | None = None

    @classmethod
    def empty(cls) -> Plan:
        return cls(method=None, handlers={})


@dataclass(frozen=True, eq=False)
class UndispatchedBlock:
    """A block's offered forward with no dispatcher inside (``hooks.offer_undispatched_forward``)."""

    forward: Callable[..., Any]
    # Every module inside the block: a policy with a handler on any other of them needs the dispatchers.
    inside: frozenset[nn.Module]
    # The attention sites inside: what the bypassed attention dispatchers would have counted.
    attention: int
    # The modules inside with a slot in ``forward``, in the block's order; held under ``lock`` while set.
    taps: Mapping[nn.Module, Tap] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """``forward`` running every tapped module."""
        if not self.taps:
            return self.forward(*args, **kwargs)
        with self.lock:
            try:
                return self.forward(*args, **kwargs)
            finally:
                for tap in self.taps.values():
                    tap.clear()


def decide_and_record(handler: ForeseeingHandler, call: ModuleCall) -> Any:
    """A foreseeing handler called on its module's call: decide, run the module unless a replay was
    decided, record."""
    output = handler.decide(call.session, call.module)
    computed = output is None
    if computed:
        output = call.run()
    handler.record(call.session, call.module, output, computed)
    return output


# A policy's handlers on the tapped modules inside one block: (module, handler, its slot).
Foreseen = tuple[tuple[nn.Module, ForeseeingHandler, Tap], ...]


@dataclass(frozen=True)
class SessionStats:
    """What the cache did during one session. Counted per denoiser call (two per step with separate CFG).

    ``*_computed`` are real executions of the module's forward; ``*_reused`` are the executions the
    uncached model would have made that the cache replaced. ``steps_cached`` counts denoiser calls in
    which anything was reused. ``peak_bytes`` is the most memory the session's state held between
    two denoiser calls (residuals, attention outputs, Taylor factors): what one more concurrent
    request under the same policy costs beside the model. ``estimated_error`` is a guarded method's
    own estimate of how far its output drifted from the uncached one (None for the others).
    """

    method: str | None
    denoiser_calls: int
    steps_computed: int
    steps_cached: int
    blocks_computed: int
    blocks_reused: int
    attention_computed: int
    attention_reused: int
    peak_bytes: int = 0
    estimated_error: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __add__(self, other: SessionStats) -> SessionStats:
        """The counts of two sessions of one request (one per transformer), added up; both sessions
        live for the whole request, so their peaks add up too (an upper bound on the joint peak)."""
        counts = {
            field.name: getattr(self, field.name) + getattr(other, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("method", "estimated_error")
        }
        # Each transformer drifts on its own steps: the request's drift is the sum of theirs.
        estimates = [s.estimated_error for s in (self, other) if s.estimated_error is not None]
        estimated_error = sum(estimates) if estimates else None
        return SessionStats(method=self.method or other.method, estimated_error=estimated_error, **counts)


class CacheSession:
    """One request's caching: its plan, its state, its counters."""

    def __init__(
        self,
        owner: object,
        layout: ModelLayout,
        plan: Plan,
        config: object | None,
        request_id: str | None = None,
        undispatched: Mapping[nn.Module, UndispatchedBlock] | None = None,
    ) -> None:
        self.owner = owner
        self.layout = layout
        self.plan = plan
        self.config = config
        self.request_id = request_id
        self._handlers = plan.handlers
        # The blocks that run their undispatched forward: those this policy acts on nothing inside of,
        # and those it acts on only through handlers that decide ahead, on tapped modules.
        self._undispatched: dict[nn.Module, tuple[UndispatchedBlock, Foreseen]] = {}
        for block, offer in (undispatched or {}).items():
            foreseen = _foreseen(offer, plan.handlers)
            if foreseen is not None:
                self._undispatched[block] = (offer, foreseen)
        self._state: dict[tuple[object, str], Any] = {}
        self._raw_timestep: Any = None
        # The run's first timestep argument, which sets the scale of a model whose family table gives none;
        # kept as passed and read only when a method asks for the timestep (reading syncs with the device).
        self._first_raw_timestep: Any = None
        # A pipeline that names no branch but calls the denoiser more than once at one timestep (Lumina 2:
        # its conditional pass, then its unconditional one) gets a branch per pass, in call order.
        self._implicit_branch = DEFAULT_BRANCH
        self._implicit_pass = 0
        self._previous_timestep: float | None = None
        self._timestep: float | None = None
        self._timestep_ready = False
        self._in_call_reuse = False
        # Per module inside a merged leaf that failed: the output this session's policy gave it there
        # (its state already moved on), and whether it was computed; the leaf's run apart takes them.
        self._settled: dict[nn.Module, tuple[Any, bool]] = {}
        self._denoiser_calls = 0
        self._calls_with_reuse = 0
        self._blocks_computed = 0
        self._attention_computed = 0
        self._peak_bytes = 0
        self._estimated_error: float | None = None
        self._closed = False

    # -- state ------------------------------------------------------------------------------------

    @property
    def branch(self) -> str:
        return _BRANCH.get() or self._implicit_branch

    @property
    def loop_position(self) -> Mapping[str, Any]:
        """What the pipeline told ``cache_context`` of the denoising loop (``step_index``, ``sigma``,
        ``num_inference_steps`` on Wan); empty where it told nothing."""
        return _LOOP_POSITION.get()

    def state(self, owner: object, factory: Callable[[], S]) -> S:
        """The state ``owner`` keeps for the current branch (cond, uncond, ...), made on first use."""
        return self._state_for((owner, self.branch), factory)

    def shared_state(self, owner: object, factory: Callable[[], S]) -> S:
        """State shared by every branch; for methods whose reference keeps one state for all passes."""
        return self._state_for((owner, ""), factory)

    def _state_for(self, key: tuple[object, str], factory: Callable[[], S]) -> S:
        found = self._state.get(key)
        if found is None:
            found = factory()
            self._state[key] = found
        return found

    @property
    def state_size(self) -> int:
        return len(self._state)

    @property
    def state_bytes(self) -> int:
        """Bytes of the tensors the session's state holds now, each storage counted once."""
        return held_bytes(self._state.values()) if self._state else 0

    def reset(self) -> None:
        """Forget all cached state; the plan stays. Used between pipeline calls of the reference API."""
        self._state.clear()
        self._raw_timestep = None
        self._first_raw_timestep = None
        self._previous_timestep = None
        self._implicit_pass = 0
        self._implicit_branch = DEFAULT_BRANCH
        self._timestep_ready = False

    def close(self) -> None:
        # The estimate lives in the state that closing drops: keep it for the stats.
        self._estimated_error = self.estimated_error
        self.reset()
        self._closed = True

    @property
    def estimated_error(self) -> float | None:
        """The plan's estimate of its drift from the uncached output (None: its method makes none)."""
        if self._closed or self.plan.estimate is None:
            return self._estimated_error
        return self.plan.estimate(self)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the denoiser call in progress ----------------------------------------------------------

    @property
    def current_timestep(self) -> float | None:
        """The denoising timestep (0..1000 scale) of the denoiser call in progress, read from its arguments."""
        if not self._timestep_ready:
            first = None
            if self.layout.family.timestep_scale is None:
                first = scalar_timestep(self._first_raw_timestep)
            self._timestep = self.layout.to_denoising_timestep(self._raw_timestep, first)
            self._timestep_ready = True
        return self._timestep

    def note_reuse(self) -> None:
        """Mark the current denoiser call as served partly from cache (beyond skipped modules)."""
        self._in_call_reuse = True

    # -- dispatch -------------------------------------------------------------------------------

    def dispatch(
        self,
        role: Role,
        module: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if role is Role.DENOISER:
            return self._dispatch_denoiser(module, forward, args, kwargs)
        settled = self._settled.pop(module, None)
        if settled is not None:
            output, computed = settled
            self._count(role, computed)
            return output
        offered = self._undispatched.get(module) if role is Role.BLOCK else None
        member = current_member()
        if member is not None and self._is_leaf(module, offered):
            forward = self._merged(member, module, forward if offered is None else offered[0].call)
        elif offered is not None:
            forward = functools.partial(self._run_offered, *offered)
        handler = self._handlers.get(module)
        if handler is None:
            output = forward(*args, **kwargs)
            computed = True
        else:
            call = ModuleCall(self, module, forward, args, kwargs)
            output = handler(call)
            computed = call.computed
        self._count(role, computed)
        return output

    def _count(self, role: Role, computed: bool) -> None:
        if role is Role.BLOCK:
            self._blocks_computed += computed
        elif role is Role.ATTENTION:
            self._attention_computed += computed
        if not computed:
            self._in_call_reuse = True

    def _is_leaf(self, module: nn.Module, offered: tuple[UndispatchedBlock, Foreseen] | None) -> bool:
        """Whether ``module``'s forward may run merged with other requests': always, but for a block whose
        undispatched forward has slots this policy acts on. Inside a merged forward, the policy still
        decides for this request's rows at every module it acts on (``dispatch_in_merged``)."""
        if offered is not None:
            return not offered[1]
        return module not in _ROWS_NOT_KEPT or not any(
            inner in self._handlers for inner in module.modules() if inner is not module
        )

    def _undo_point(self) -> Callable[[], None]:
        """What puts this session's counters back as they are now."""
        counters = (self._blocks_computed, self._attention_computed, self._in_call_reuse)

        def restore() -> None:
            self._blocks_computed, self._attention_computed, self._in_call_reuse = counters

        return restore

    def _settle(self, module: nn.Module, output: Any, computed: bool) -> None:
        self._settled[module] = (output, computed)

    def _merged(
        self, member: BatchMember, module: nn.Module, forward: Callable[..., Any]
    ) -> Callable[..., Any]:
        """``forward`` run by ``member``'s batch, merged with other requests' calls of ``module``."""
        position = self.layout.position(module)

        def merged(*args: Any, **kwargs: Any) -> Any:
            return member.batcher.run(member, module, position, forward, args, kwargs)

        return merged

    def _run_offered(self, offer: UndispatchedBlock, foreseen: Foreseen, *args: Any, **kwargs: Any) -> Any:
        """A block's undispatched forward, its tapped modules decided before and recorded after."""
        if not foreseen:
            output = offer.call(*args, **kwargs)
            self._attention_computed += offer.attention
            return output
        with offer.lock:
            replays = []
            try:
                for module, handler, tap in foreseen:
                    replay = handler.decide(self, module)
                    replays.append(replay)
                    tap.replay = replay
                output = offer.forward(*args, **kwargs)
                used = [tap.output for _, _, tap in foreseen]
            finally:
                for tap in offer.taps.values():
                    tap.clear()
        for (module, handler, _), replay, output_used in zip(foreseen, replays, used, strict=True):
            if output_used is None:
                raise RuntimeError(
                    f"the undispatched forward of a block never called its {type(module).__name__}"
                )
            handler.record(self, module, output_used, replay is None)
        reused = sum(replay is not None for replay in replays)
        self._attention_computed += offer.attention - reused
        if reused:
            self._in_call_reuse = True
        return output

    def _dispatch_denoiser(
        self,
        module: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        member = current_member()
        if member is not None:
            member.enter_loop()
        raw = self.layout.timestep_from_call(args, kwargs)
        self._raw_timestep = raw
        if self._first_raw_timestep is None:
            self._first_raw_timestep = raw.detach().clone() if isinstance(raw, torch.Tensor) else raw
        if _BRANCH.get() is None and self.layout.family.unnamed_passes:
            # Only these families pay for reading the timestep on every call.
            timestep = scalar_timestep(raw)
            repeated = timestep is not None and timestep == self._previous_timestep
            self._implicit_pass = self._implicit_pass + 1 if repeated else 0
            self._implicit_branch = (
                DEFAULT_BRANCH if self._implicit_pass == 0 else f"{DEFAULT_BRANCH}:{self._implicit_pass}"
            )
            self._previous_timestep = timestep
        self._timestep_ready = False
        self._in_call_reuse = False
        self._settled.clear()
        blocks_before = self._blocks_computed
        attention_before = self._attention_computed
        handler = self._handlers.get(module)
        if handler is None:
            output = forward(*args, **kwargs)
        else:
            output = handler(ModuleCall(self, module, forward, args, kwargs))
        self._denoiser_calls += 1
        full = (
            not self._in_call_reuse
            and self._blocks_computed - blocks_before == len(self.layout.blocks)
            and self._attention_computed - attention_before == len(self.layout.attention)
        )
        if not full:
            self._calls_with_reuse += 1
        # Between denoiser calls the state holds exactly what the next call may reuse: its high mark.
        if self._state:
            self._peak_bytes = max(self._peak_bytes, held_bytes(self._state.values()))
        return output

    @property
    def stats(self) -> SessionStats:
        calls = self._denoiser_calls
        return SessionStats(
            method=self.plan.method,
            denoiser_calls=calls,
            steps_computed=calls - self._calls_with_reuse,
            steps_cached=self._calls_with_reuse,
            blocks_computed=self._blocks_computed,
            blocks_reused=calls * len(self.layout.blocks) - self._blocks_computed,
            attention_computed=self._attention_computed,
            attention_reused=calls * len(self.layout.attention) - self._attention_computed,
            peak_bytes=self._peak_bytes,
            estimated_error=self.estimated_error,
        )


def _foreseen(offer: UndispatchedBlock, handlers: Mapping[nn.Module, Handler]) -> Foreseen | None:
    """The handlers ``offer`` runs its forward under, or None if a handler inside it needs the
    dispatchers: one on a module without a slot, or one that cannot decide ahead."""
    acting = [module for module in offer.inside if module in handlers]
    if any(
        module not in offer.taps or not isinstance(handlers[module], ForeseeingHandler) for module in acting
    ):
        return None
    return tuple(
        (module, handler, tap)
        for module, tap in offer.taps.items()
        if isinstance(handler := handlers.get(module), ForeseeingHandler)
    )


def held_bytes(values: Iterable[object]) -> int:
    """Bytes of the tensor storages reachable from ``values`` through method state objects.

    Walks containers (tuple, list, dict, set) and the attributes of plain state objects (``__slots__``
    or ``__dict__``), never modules or classes; counts each storage once, whole, since a view keeps
    all of its storage alive. Method code stays free of accounting: whatever a method keeps in its
    state is found here.
    """
    storages: dict[tuple[str, int], int] = {}
    seen: set[int] = set()
    pending = list(values)
    while pending:
        value = pending.pop()
        if isinstance(value, (str, bytes, int, float, bool, type(None))) or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            _add_storage(value, storages)
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (tuple, list, set, frozenset)):
            pending.extend(value)
        elif not isinstance(value, (nn.Module, type)) and not callable(value):
            pending.extend(_attributes(value))
    return sum(storages.values())


def _add_storage(tensor: torch.Tensor, storages: dict[tuple[str, int], int]) -> None:
    try:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    except (RuntimeError, NotImplementedError):
        # Tensor subclasses without a plain storage: their logical size, keyed by identity.
        storages[("", id(tensor))] = tensor.numel() * tensor.element_size()


def _attributes(value: object) -> list[object]:
    found = list(getattr(value, "__dict__", {}).values())
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if hasattr(value, name):
                found.append(getattr(value, name))
    return found


def active_session(owner: object | None = None) -> CacheSession | None:
    """The innermost bound session, or the innermost one of ``owner`` when it is given."""
    return _innermost(_ACTIVE_SESSIONS.get(), owner)


def _innermost(sessions: tuple[CacheSession, ...], owner: object | None) -> CacheSession | None:
    for session in reversed(sessions):
        if owner is None or session.owner is owner:
            return session
    return None


@contextmanager
def bound(session: CacheSession) -> Iterator[CacheSession]:
    """Bind ``session`` for the current thread or task, and discard its state whatever happens."""
    token = _ACTIVE_SESSIONS.set((*_ACTIVE_SESSIONS.get(), session))
    try:
        yield session
    finally:
        _ACTIVE_SESSIONS.reset(token)
        session.close()


def dispatch_in_merged(
    owner: object,
    calls: tuple[MergedCall, ...],
    role: Role,
    module: nn.Module,
    forward: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """A dispatched module inside a merged leaf, for the rows of ``calls``: each request's policy decides
    for its own rows, as its own dispatcher would have, and each session records and counts its own.

    The rows of requests whose policies do not act on the module, or decide beforehand to compute it (a
    foreseeing handler), run together; a foreseeing handler's replay takes the place of its rows; any
    other handler is called on its request's rows alone (FasterCache, which reads the call's batch)."""
    # Read from the context each call parked in, without entering it.
    sessions = [_innermost(call.context.get(_ACTIVE_SESSIONS, ()), owner) for call in calls]
    handlers = [None if session is None else session._handlers.get(module) for session in sessions]
    for call, session in zip(calls, sessions, strict=True):
        if session is not None and not call.undo:
            call.undo.append(session._undo_point())
    if not any(handlers):
        output = forward(*args, **kwargs)
        for session in sessions:
            if session is not None:
                session._count(role, True)
        return output
    rows = [call.rows for call in calls]
    if leading_rows(args, kwargs) != sum(rows):
        # The block hands this module another batch (frames folded into it): no request's rows can be
        # told apart here. Its calls run apart, and from now on it merges only where nothing acts inside.
        _ROWS_NOT_KEPT.add(calls[0].module)
        raise RowsNotKept(f"{type(module).__name__} is not called on its block's rows")
    outputs: list[Any] = [None] * len(calls)
    computed = [True] * len(calls)
    together: list[int] = []
    for index, (call, session, handler) in enumerate(zip(calls, sessions, handlers, strict=True)):
        if session is None or handler is None:
            together.append(index)
        elif isinstance(handler, ForeseeingHandler):
            with _as_in(call):
                outputs[index] = handler.decide(session, module)
            computed[index] = outputs[index] is None
            if computed[index]:
                together.append(index)
    if together:
        taken = (args, kwargs) if len(together) == len(calls) else take_rows(args, kwargs, rows, together)
        ran = run_for_rows(tuple(calls[index] for index in together), forward, *taken[0], **taken[1])
        for index, piece in zip(together, split_rows(ran, [rows[index] for index in together]), strict=True):
            outputs[index] = piece
    for index, (call, session, handler) in enumerate(zip(calls, sessions, handlers, strict=True)):
        if session is None or handler is None:
            if session is not None:
                session._count(role, True)
            continue
        with _as_in(call):
            if isinstance(handler, ForeseeingHandler):
                handler.record(session, module, outputs[index], computed[index])
            else:
                own_args, own_kwargs = take_rows(args, kwargs, rows, [index])
                own = ModuleCall(
                    session, module, functools.partial(run_for_rows, (call,), forward), own_args, own_kwargs
                )
                outputs[index] = handler(own)
                computed[index] = own.computed
        session._count(role, computed[index])
        call.undo.append(functools.partial(session._settle, module, outputs[index], computed[index]))
    return join_rows(outputs)


class RowsNotKept(RuntimeError):
    """A module inside a merged leaf is called on another batch than the leaf's rows."""


# Blocks inside which a module is called on another batch than the block's: a policy acting inside
# them cannot decide per request there, so such a block merges whole only where no policy acts inside.
_ROWS_NOT_KEPT: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@contextmanager
def _as_in(call: MergedCall) -> Iterator[None]:
    """The branch and loop position ``call``'s request was at when it parked, for its handler's decision."""
    branch_token = _BRANCH.set(call.context.get(_BRANCH))
    position_token = _LOOP_POSITION.set(call.context.get(_LOOP_POSITION, MappingProxyType({})))
    try:
        yield
    finally:
        _LOOP_POSITION.reset(position_token)
        _BRANCH.reset(branch_token)


@contextmanager
def branch(name: str, position: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Name the denoiser pass in progress (``cond``, ``uncond``, ``cond_uncond``) for this thread, with
    what the pipeline says of the loop's ``position`` (its ``cache_context`` keywords)."""
    token = _BRANCH.set(name)
    position_token = _LOOP_POSITION.set(MappingProxyType(dict(position or {})))
    try:
        yield
    finally:
        _LOOP_POSITION.reset(position_token)
        _BRANCH.reset(token)
