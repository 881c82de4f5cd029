"""Merged forwards: the same module's calls from concurrent requests run as one batched call.

Every request keeps its own pipeline call, thread and cache session, so its arguments, steps,
callbacks and cache decisions are its own. What is merged is a *leaf*: the real forward of a block (or
of an attention module, where the request's policy acts inside the block) that the request's own
policy decided to compute. The calls of one leaf that are parked together are concatenated along the
batch, run once, and split back; a request that reuses a cached output never parks, so each row's
policy decides for that row alone.

The requests of a batch move through the transformer in step: a parked call runs only once every
request inside its denoising loop has parked too (or has stalled for ``stall_s``), and the call nearest
the input runs first, so a request that fell behind catches up with the others and merges with them
from there on. A request admitted but not yet denoising (encoding its prompt) is waited for at most
``wait_s``.

A merged call that raises is run again apart, call by call, so one bad member fails only itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import Context, ContextVar, copy_context
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["BatchMember", "BatchStats", "ForwardBatcher", "current_member"]

_MEMBER: ContextVar[BatchMember | None] = ContextVar("cache_engine_batch_member", default=None)


def current_member() -> BatchMember | None:
    """The batch the request running in this thread or task belongs to; None: it runs alone."""
    return _MEMBER.get()


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

    def __init__(self, batcher: ForwardBatcher, affinity: Hashable) -> None:
        self.batcher = batcher
        # Requests merge only with requests of equal affinity: what their context changes inside a leaf
        # (the LoRA adapters a server applies by forward hooks, read from the caller's context).
        self.affinity = affinity
        self.in_loop = False
        self.parked: _Call | None = None
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


class _Call:
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
        "position",
        "rows",
        "spec",
        "structure",
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
        self.output: Any = None
        self.error: BaseException | None = None
        self.done = False

    def merges_with(self, other: _Call) -> bool:
        if (
            other.module is not self.module
            or other.member.affinity != self.member.affinity
            or other.structure != self.structure
            or other.spec != self.spec
        ):
            return False
        return all(
            kind == "row" or _same(mine, theirs)
            for (kind, *_), mine, theirs in zip(self.spec, self.leaves, other.leaves, strict=True)
        )

    def run_alone(self) -> None:
        try:
            self.output = self.context.run(self.forward, *self.args, **self.kwargs)
        except Exception as exc:
            self.error = exc


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


def _rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
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
        self._condition = threading.Condition()
        self._members: list[BatchMember] = []
        self._parked: list[_Call] = []
        self._busy = False
        self._last_event = time.monotonic()

    def admit(self, affinity: Hashable = None) -> BatchMember:
        """A request that will run now; bind it with ``member.bound()`` in the thread that runs it."""
        member = BatchMember(self, affinity)
        with self._condition:
            self._members.append(member)
            self._event()
        return member

    @property
    def members(self) -> int:
        with self._condition:
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
        """``forward(*args, **kwargs)`` for ``member``, merged with the same leaf's parked calls."""
        rows = _rows(args, kwargs)
        if rows is None:
            return forward(*args, **kwargs)
        call = _Call(member, module, position, forward, args, kwargs, rows)
        with self._condition:
            member.in_loop = True
            member.parked = call
            self._parked.append(call)
            self._event()
            while not call.done:
                group = None if self._busy else self._next_group()
                if group is None:
                    self._condition.wait(None if self._busy else self._patience())
                    continue
                self._busy = True
                self._condition.release()
                try:
                    self._execute(group)
                finally:
                    self._condition.acquire()
                    self._busy = False
                    for done in group:
                        done.done = True
                    self._event()
        if call.error is not None:
            raise call.error
        return call.output

    # -- choosing -----------------------------------------------------------------------------------

    def _next_group(self) -> list[_Call] | None:
        """The calls to run now, or None to wait (``_patience`` says how long at most)."""
        if not self._parked or self._patience() is not None:
            return None
        first = min(self._parked, key=lambda call: call.position)
        group = [call for call in self._parked if call is first or first.merges_with(call)]
        for call in group:
            self._parked.remove(call)
            call.member.parked = None
        return group

    def _patience(self) -> float | None:
        """Seconds left to wait for companions before running the parked calls; None: run now."""
        now = time.monotonic()
        waits = []
        if any(m.in_loop and m.parked is None for m in self._members):
            waits.append(self._last_event + self.stall_s - now)
        starting = any(not m.in_loop for m in self._members) or (
            self._arriving is not None and self._arriving()
        )
        if starting and self.wait_s > 0:
            waits.append(min(call.arrived for call in self._parked) + self.wait_s - now)
        left = max(waits, default=0.0)
        return left if left > 0 else None

    def _event(self) -> None:
        self._last_event = time.monotonic()
        self._condition.notify_all()

    # -- membership ---------------------------------------------------------------------------------

    def _set_in_loop(self, member: BatchMember, in_loop: bool) -> None:
        with self._condition:
            member.in_loop = in_loop
            self._event()

    def _leave(self, member: BatchMember) -> None:
        with self._condition:
            if member in self._members:
                self._members.remove(member)
            member.in_loop = False
            self._event()

    # -- running ------------------------------------------------------------------------------------

    def _execute(self, group: list[_Call]) -> None:
        if len(group) == 1:
            group[0].run_alone()
        else:
            try:
                outputs = self._merged(group)
            except Exception:
                # Whichever member made it fail fails alone; the others get what they would alone.
                for call in group:
                    call.run_alone()
            else:
                for call, output in zip(group, outputs, strict=True):
                    call.output = output
        for call in group:
            call.member._ran_in(len(group))
        if self._on_run is not None:
            self._on_run(len(group))

    def _merged(self, group: list[_Call]) -> list[Any]:
        anchor = group[0]
        leaves = [
            torch.cat([call.leaves[index] for call in group]) if kind == "row" else leaf
            for index, ((kind, *_), leaf) in enumerate(zip(anchor.spec, anchor.leaves, strict=True))
        ]
        args, kwargs = pytree.tree_unflatten(leaves, anchor.structure)
        output = anchor.context.run(anchor.forward, *args, **kwargs)
        rows = [call.rows for call in group]
        total = sum(rows)
        flat, structure = pytree.tree_flatten(output)
        per_call: list[list[Any]] = [[] for _ in group]
        for leaf in flat:
            if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
                if leaf.shape[0] != total:
                    raise ValueError("a merged leaf returned a tensor without the batch's rows")
                # Copies, so that a row kept in a request's cache state holds only its own rows.
                for pieces, piece in zip(per_call, leaf.split(rows), strict=True):
                    pieces.append(piece.clone())
            else:
                for pieces in per_call:
                    pieces.append(leaf)
        return [pytree.tree_unflatten(pieces, structure) for pieces in per_call]
