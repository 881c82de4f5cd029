"""Merged forwards: the same module's calls from concurrent requests run as one batched call.

Every request keeps its own pipeline call, thread and cache session, so its arguments, steps,
callbacks and cache decisions are its own. What is merged is a *leaf*: the real forward of a transformer
block that the request's policy decided to compute (or of a module outside the blocks that a policy acts
on). The calls of one leaf parked together are concatenated along the batch, run once, and split back;
a request that reuses a block's cached output never parks. Inside a merged block, each request's policy
still decides for its own rows at every module it acts on (an attention it reuses, say), through the
sessions' ``dispatch_in_merged``: so each row's policy decides for that row alone.

Scheduling, with one leaf running at a time:

- the parked calls run once every request inside its denoising loop has parked (or the others stalled
  for ``stall_s``), so that the requests move through the transformer in step; a request admitted but
  not yet denoising is waited for at most ``wait_s``;
- the largest group runs first, nearest the input among equals, and a call passed over
  ``PASSED_OVER_AT_MOST`` times runs next whatever its group's size;
- the requests whose calls were done resume one at a time (a baton passed at each park), so that
  their code between leaves never contends for the interpreter lock.

A merged call that raises is run again apart, call by call, so one bad member fails only itself.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import Context, ContextVar, copy_context
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

# A parked call passed over this many times runs next, whatever the size of its group.
PASSED_OVER_AT_MOST = 16

__all__ = [
    "BatchMember",
    "BatchStats",
    "ForwardBatcher",
    "MergedCall",
    "current_member",
    "join_rows",
    "leading_rows",
    "merged_calls",
    "run_for_rows",
    "split_rows",
    "take_rows",
]

_MEMBER: ContextVar[BatchMember | None] = ContextVar("cache_engine_batch_member", default=None)
# The calls whose rows the merged leaf running in this thread holds, in row order.
_MERGED: ContextVar[tuple[MergedCall, ...] | None] = ContextVar("cache_engine_merged_calls", default=None)


def current_member() -> BatchMember | None:
    """The batch the request running in this thread or task belongs to; None: it runs alone."""
    return _MEMBER.get()


def merged_calls() -> tuple[MergedCall, ...] | None:
    """Inside a merged leaf's forward: the parked calls whose rows it holds, in row order."""
    return _MERGED.get()


@dataclass(frozen=True)
class BatchStats:
    """How one request's leaf forwards ran: ``runs`` of them, ``merged`` shared with another request,
    ``mean`` and ``largest`` the number of requests in the calls they ran in (1: alone)."""

    runs: int
    merged: int
    mean: float
    largest: int

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "merged": self.merged, "mean": self.mean, "largest": self.largest}


class BatchMember:
    """One request's place in a :class:`ForwardBatcher`, from its admission until it is done."""

    def __init__(self, batcher: ForwardBatcher) -> None:
        self.batcher = batcher
        self.in_loop = False
        # Past its last denoiser call (decoding): never waited for as one about to start.
        self.loop_done = False
        self.parked: MergedCall | None = None
        # time.monotonic() since which it has been running its own code (not parked); past ``stall_s``
        # the others stop waiting for it until it parks again.
        self.running_since = time.monotonic()
        self._runs = 0
        self._merged = 0
        self._sizes = 0
        self._largest = 0

    def enter_loop(self) -> None:
        """Called at each denoiser call: from now on, the others' parked calls wait for this request's."""
        if not self.in_loop:
            self.batcher._set_in_loop(self, True)

    def leave_loop(self) -> None:
        """The request's last denoiser call is over (it decodes next): nobody waits for it any more."""
        self.loop_done = True
        if self.in_loop:
            self.batcher._set_in_loop(self, False)

    @contextmanager
    def bound(self) -> Iterator[BatchMember]:
        """Bind this member for the request's thread; it leaves the batch when the block ends."""
        token = _MEMBER.set(self)
        try:
            yield self
        finally:
            _MEMBER.reset(token)
            self.batcher._leave(self)

    @property
    def stats(self) -> BatchStats:
        mean = self._sizes / self._runs if self._runs else 0.0
        return BatchStats(self._runs, self._merged, round(mean, 3), self._largest)

    def _ran_in(self, size: int) -> None:
        self._runs += 1
        self._merged += size > 1
        self._sizes += size
        self._largest = max(self._largest, size)


class MergedCall:
    """One parked leaf call: its arguments flattened, told apart into rows and shared values."""

    __slots__ = (
        "args",
        "arrived",
        "context",
        "done",
        "error",
        "forward",
        "kwargs",
        "leaves",
        "member",
        "module",
        "output",
        "passed",
        "position",
        "released",
        "rows",
        "spec",
        "structure",
        "undo",
        "wake",
    )

    def __init__(
        self,
        member: BatchMember,
        module: nn.Module,
        position: int,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rows: int,
    ) -> None:
        self.member = member
        self.module = module
        self.position = position
        self.forward = forward
        self.args = args
        self.kwargs = kwargs
        self.rows = rows
        self.context: Context = copy_context()
        self.leaves, self.structure = pytree.tree_flatten((args, kwargs))
        self.spec = tuple(_describe(leaf, rows) for leaf in self.leaves)
        self.arrived = time.monotonic()
        self.wake = threading.Event()
        self.passed = 0
        self.released = False
        self.output: Any = None
        self.error: BaseException | None = None
        self.done = False
        # What a merged run of this call changed in its request's own state, to take back (in reverse)
        # if the merged run fails and the call runs again apart.
        self.undo: list[Callable[[], None]] = []

    def merges_with(self, other: MergedCall) -> bool:
        if other.module is not self.module or other.structure != self.structure or other.spec != self.spec:
            return False
        return all(
            kind == "row" or _same(mine, theirs)
            for (kind, *_), mine, theirs in zip(self.spec, self.leaves, other.leaves, strict=True)
        )

    def rollback(self) -> None:
        """Take back what a failed merged run of this call changed in its request's state."""
        while self.undo:
            self.undo.pop()()

    def run_alone(self) -> None:
        """The call's forward on its own rows, in its own context (its sessions, branch, adapters)."""
        try:
            self.output = self.context.run(_holding, None, self.forward, self.args, self.kwargs)
        except Exception as exc:
            self.error = exc


def _holding(
    calls: tuple[MergedCall, ...] | None,
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``function`` run by the batch itself, never parking: for the rows of ``calls`` merged, or (None)
    for one call's own."""
    member, merged = _MEMBER.set(None), _MERGED.set(calls)
    try:
        return function(*args, **kwargs)
    finally:
        _MERGED.reset(merged)
        _MEMBER.reset(member)


def run_for_rows(
    calls: tuple[MergedCall, ...], function: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``function`` run inside a merged leaf on the rows of ``calls`` only (some of the leaf's calls)."""
    merged = _MERGED.set(calls)
    try:
        return function(*args, **kwargs)
    finally:
        _MERGED.reset(merged)


def take_rows(
    args: tuple[Any, ...], kwargs: dict[str, Any], rows: Sequence[int], taken: Sequence[int]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Merged arguments cut down to the rows of the calls at indices ``taken`` (each call holding
    ``rows[i]`` rows, in order); an argument without the batch's rows is shared as it is."""
    total = sum(rows)
    starts = [sum(rows[:index]) for index in range(len(rows))]
    flat, structure = pytree.tree_flatten((args, kwargs))
    cut = [
        torch.cat([leaf[starts[index] : starts[index] + rows[index]] for index in taken])
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == total
        else leaf
        for leaf in flat
    ]
    taken_args, taken_kwargs = pytree.tree_unflatten(cut, structure)
    return taken_args, taken_kwargs


def join_rows(outputs: Sequence[Any]) -> Any:
    """Per-call outputs of one structure joined into the merged call's, along the batch."""
    flats = [pytree.tree_flatten(output) for output in outputs]
    structure = flats[0][1]
    joined = [
        torch.cat(leaves) if isinstance(leaves[0], torch.Tensor) and leaves[0].dim() >= 1 else leaves[0]
        for leaves in zip(*(flat for flat, _ in flats), strict=True)
    ]
    return pytree.tree_unflatten(joined, structure)


def split_rows(output: Any, rows: Sequence[int]) -> list[Any]:
    """A merged call's output split into each call's, each call's rows copied into storage of its own
    (so that a row kept in a request's cache state holds only its own rows)."""
    total = sum(rows)
    flat, structure = pytree.tree_flatten(output)
    per_call: list[list[Any]] = [[] for _ in rows]
    for leaf in flat:
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            if leaf.shape[0] != total:
                raise ValueError("a merged call returned a tensor without the batch's rows")
            for pieces, piece in zip(per_call, leaf.split(list(rows)), strict=True):
                pieces.append(piece.clone())
        else:
            for pieces in per_call:
                pieces.append(leaf)
    return [pytree.tree_unflatten(pieces, structure) for pieces in per_call]


def _left(deadline: float) -> float | None:
    """Seconds until ``deadline`` (``time.monotonic()``); None once it has passed."""
    left = deadline - time.monotonic()
    return left if left > 0 else None


def _describe(leaf: Any, rows: int) -> tuple[Any, ...]:
    if isinstance(leaf, torch.Tensor):
        kind = "row" if leaf.dim() >= 1 and leaf.shape[0] == rows else "shared"
        shape = tuple(leaf.shape[1:]) if kind == "row" else tuple(leaf.shape)
        return (kind, shape, leaf.dtype, leaf.device)
    return ("value", type(leaf))


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


def leading_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The call's batch: the leading size of its first tensor argument (its hidden states)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() >= 1 else None
    return None


class ForwardBatcher:
    """Merges the leaf forwards of the requests running at once on one model copy (all its transformers).

    ``wait_s``: how long a parked call waits for admitted requests that have not started denoising, and
    while ``arriving()`` says more are about to be admitted. ``stall_s``: how long it waits for a
    request inside its loop that has not parked (a safeguard; such a request parks within one block).
    ``on_run(size)`` is told the number of requests of every leaf call run.
    """

    def __init__(
        self,
        *,
        wait_s: float = 0.0,
        stall_s: float = 0.5,
        arriving: Callable[[], bool] | None = None,
        on_run: Callable[[int], None] | None = None,
    ) -> None:
        self.wait_s = wait_s
        self.stall_s = stall_s
        self._arriving = arriving
        self._on_run = on_run
        self._lock = threading.Lock()
        self._members: list[BatchMember] = []
        self._parked: list[MergedCall] = []
        self._busy = False
        # Calls done but not yet handed back, and the member running its code between leaves now.
        self._resuming: deque[MergedCall] = deque()
        self._baton: BatchMember | None = None

    def admit(self) -> BatchMember:
        """A request that will run now; bind it with ``member.bound()`` in the thread that runs it."""
        member = BatchMember(self)
        with self._lock:
            self._members.append(member)
            self._event()
        return member

    @property
    def members(self) -> int:
        with self._lock:
            return len(self._members)

    def run(
        self,
        member: BatchMember,
        module: nn.Module,
        position: int,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """``forward(*args, **kwargs)`` for ``member``, merged with the same leaf's parked calls.

        The thread whose park makes a group ready runs it, in the thread it parked in; the others sleep
        until their call is done and the baton reaches them, or until they are woken to check whether a
        group is ready (a member came or went, a wait ran out)."""
        rows = leading_rows(args, kwargs)
        if rows is None:
            return forward(*args, **kwargs)
        if self._alone(member):
            member.in_loop = True
            member._ran_in(1)
            if self._on_run is not None:
                self._on_run(1)
            # Run as the batch runs a leaf: the modules inside it are part of it, not leaves of their own.
            return _holding(None, forward, args, kwargs)
        call = MergedCall(member, module, position, forward, args, kwargs, rows)
        with self._lock:
            member.in_loop = True
            member.parked = call
            self._parked.append(call)
            self._pass_baton(member)
        while True:
            with self._lock:
                call.wake.clear()
                if call.released:
                    break
                if call.done:
                    # Waiting for the baton: a holder held up past ``stall_s`` (a slow step callback)
                    # goes on without it.
                    group = None
                    patience = self._baton_patience()
                    if patience is None:
                        self._pass_baton(self._baton)
                        continue
                elif self._busy:
                    # The runner's end wakes a parked call to look again.
                    group, patience = None, None
                else:
                    # Read once: a wait that ran out between two readings would otherwise be waited for
                    # without end.
                    patience = self._patience()
                    group = self._take_group() if patience is None else None
                    if group is not None:
                        self._busy = True
            if group is None:
                call.wake.wait(patience)
                continue
            try:
                self._execute(group)
            finally:
                with self._lock:
                    self._busy = False
                    now = time.monotonic()
                    for done in group:
                        done.done = True
                        done.member.running_since = now
                        if done is call:
                            done.released = True
                        else:
                            self._resuming.append(done)
                    if self._baton is None:
                        self._pass_baton(None)
                    self._watch_baton()
                    self._event()
        if call.error is not None:
            raise call.error
        return call.output

    def _alone(self, member: BatchMember) -> bool:
        """Whether ``member`` is the only request here, with none about to come: it runs its leaf in
        place, paying nothing for a batch of one. Read without the lock: a request admitted a moment
        later parks at its own next leaf, and this one at its next."""
        members = self._members
        return (
            len(members) == 1
            and members[0] is member
            and not self._parked
            and not self._busy
            and (self._arriving is None or not self._arriving())
        )

    # -- choosing -----------------------------------------------------------------------------------

    def _take_group(self) -> list[MergedCall]:
        """The parked calls to run now, taken out: the largest group, unless a call was passed over
        ``PASSED_OVER_AT_MOST`` times."""
        groups = self._groups()
        chosen = max(
            groups, key=lambda group: (max(call.passed for call in group) >= PASSED_OVER_AT_MOST, len(group))
        )
        for group in groups:
            if group is not chosen:
                for call in group:
                    call.passed += 1
        for call in chosen:
            self._parked.remove(call)
            call.member.parked = None
        return chosen

    def _groups(self) -> list[list[MergedCall]]:
        groups: list[list[MergedCall]] = []
        for call in sorted(self._parked, key=lambda parked: parked.position):
            for group in groups:
                if group[0].merges_with(call):
                    group.append(call)
                    break
            else:
                groups.append([call])
        return groups

    def _starting_wait(self) -> float | None:
        starting = any(not m.in_loop and not m.loop_done for m in self._members) or (
            self._arriving is not None and self._arriving()
        )
        if not starting or self.wait_s <= 0:
            return None
        return _left(min(call.arrived for call in self._parked) + self.wait_s)

    def _patience(self) -> float | None:
        """Seconds left to wait for companions before running the parked calls; None: run now."""
        # The requests running their own code inside their loops: each parks within a block, unless it
        # is held up (a slow step callback); past ``stall_s`` it is not waited for.
        deadlines = [
            member.running_since + self.stall_s
            for member in self._members
            if member.in_loop and member.parked is None
        ]
        starting = self._starting_wait()
        waits = [wait for wait in (_left(max(deadlines, default=0.0)), starting) if wait is not None]
        return max(waits, default=None)

    def _event(self) -> None:
        """Membership changed: a parked call may be able to run now, so its thread checks."""
        if self._parked and not self._busy:
            self._parked[0].wake.set()

    # -- membership ---------------------------------------------------------------------------------

    def _set_in_loop(self, member: BatchMember, in_loop: bool) -> None:
        with self._lock:
            member.in_loop = in_loop
            member.running_since = time.monotonic()
            self._pass_baton(member)
            self._event()

    def _leave(self, member: BatchMember) -> None:
        with self._lock:
            if member in self._members:
                self._members.remove(member)
            member.in_loop = False
            self._pass_baton(member)
            self._event()

    def _baton_patience(self) -> float | None:
        """Seconds the baton's holder may still keep it; None: pass it on now."""
        holder = self._baton
        return None if holder is None else _left(holder.running_since + self.stall_s)

    def _pass_baton(self, holder: BatchMember | None) -> None:
        """``holder`` no longer runs between two leaves: the next member whose call is done may go on.
        One member at a time runs its code between leaves (while the leaves run on another core), so
        that the members' Python never fights over the interpreter lock."""
        if self._baton is not holder:
            return
        self._baton = None
        if self._resuming:
            call = self._resuming.popleft()
            self._baton = call.member
            call.member.running_since = time.monotonic()
            call.released = True
            call.wake.set()
            self._watch_baton()

    def _watch_baton(self) -> None:
        """The next call in line for the baton watches its holder (``_baton_patience``), so that a
        holder held up does not hold the line for ever."""
        if self._resuming and self._baton is not None:
            self._resuming[0].wake.set()

    # -- running ------------------------------------------------------------------------------------

    def _execute(self, group: list[MergedCall]) -> None:
        if len(group) == 1:
            group[0].run_alone()
        else:
            try:
                outputs = self._merged(group)
            except Exception:
                # Whichever member made it fail fails alone; the others get what they would alone.
                for call in group:
                    call.rollback()
                    call.run_alone()
            else:
                for call, output in zip(group, outputs, strict=True):
                    call.output = output
        for call in group:
            call.member._ran_in(len(group))
        if self._on_run is not None:
            self._on_run(len(group))

    def _merged(self, group: list[MergedCall]) -> list[Any]:
        anchor = group[0]
        leaves = [
            torch.cat([call.leaves[index] for call in group]) if kind == "row" else leaf
            for index, ((kind, *_), leaf) in enumerate(zip(anchor.spec, anchor.leaves, strict=True))
        ]
        args, kwargs = pytree.tree_unflatten(leaves, anchor.structure)
        output = anchor.context.run(_holding, tuple(group), anchor.forward, args, kwargs)
        return split_rows(output, [call.rows for call in group])
