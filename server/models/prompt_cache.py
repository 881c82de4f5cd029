"""Prompt embeddings kept across requests: a pipeline's ``encode_prompt`` answered from memory when it was
asked the very same thing before.

Keyed by the tenant, the encoding function and its exact arguments (prompts, device, count, length, and every other
one), so a hit returns what the encoders would have computed, to the bit: the text encoders are
deterministic and their weights do not change while served. A call given tensors (precomputed
embeddings) is never cached. The cache is bounded in bytes, the least recently used entry leaving
first; it lives with its model and empties with the process. What each generation hit and missed is
tallied for its answer.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from server.models.bounded import BytesBoundedLRU

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["PromptCache", "Tally"]


@dataclass
class Tally:
    """One generation's prompt encodings answered from the cache (hits) and computed (misses)."""

    hits: int = 0
    misses: int = 0


_TALLY: ContextVar[Tally | None] = ContextVar("ditcache_prompt_cache_tally", default=None)
# The tenant of the generation encoding: one tenant's prompts never answer another's (a hit would tell
# them that someone encoded the same prompt).
_TENANT: ContextVar[str] = ContextVar("ditcache_prompt_cache_tenant", default="")


class _Uncacheable(Exception):
    """An argument that is no plain value (a tensor, an image): the call runs as it is."""


class PromptCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: BytesBoundedLRU[Any] = BytesBoundedLRU(max_bytes)
        # Totals over the process, for tests and logs; each generation's own are its Tally.
        self._counting = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        """What the kept embeddings take, in bytes."""
        return self._entries.bytes

    def attach(self, pipeline: DiffusionPipeline) -> None:
        """Answer ``pipeline.encode_prompt`` from this cache where it can (a pipeline without one keeps
        running its encoders)."""
        encode = getattr(pipeline, "encode_prompt", None)
        if not callable(encode) or self.max_bytes <= 0:
            return
        # The encoding function itself keys the entries: task pipelines on the same components share
        # them where they share it, and no two functions' results mix.
        owner = getattr(
            getattr(type(pipeline), "encode_prompt", None), "__qualname__", type(pipeline).__qualname__
        )

        @functools.wraps(encode)
        def cached(*args: Any, **kwargs: Any) -> Any:
            try:
                key = (_TENANT.get(), owner, _frozen(args), _frozen(tuple(sorted(kwargs.items()))))
            except _Uncacheable:
                return encode(*args, **kwargs)
            return self._get_or_compute(key, lambda: encode(*args, **kwargs))

        pipeline.encode_prompt = cached

    @contextmanager
    def tally(self, tenant: str = "") -> Iterator[Tally]:
        """Count this generation's hits and misses (the encodings run in the calling thread), among
        ``tenant``'s entries."""
        counts = Tally()
        token = _TALLY.set(counts)
        tenant_token = _TENANT.set(tenant)
        try:
            yield counts
        finally:
            _TENANT.reset(tenant_token)
            _TALLY.reset(token)

    def _get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        found = self._entries.get(key)
        self._count(hit=found is not None)
        if found is not None:
            return _copied(found)
        value = compute()
        stored = _copied(value)
        self._entries.put(key, stored, _size(stored))
        return value

    def _count(self, *, hit: bool) -> None:
        counts = _TALLY.get()
        with self._counting:
            if hit:
                self.hits += 1
            else:
                self.misses += 1
        if counts is not None:
            if hit:
                counts.hits += 1
            else:
                counts.misses += 1


def _frozen(value: Any) -> Hashable:
    """``value`` as a hashable key, or _Uncacheable for anything that is not a plain value."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return (type(value).__name__, value)
    if isinstance(value, (torch.device, torch.dtype)):
        return (type(value).__name__, str(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(item) for item in value))
    raise _Uncacheable(type(value).__name__)


def _copied(value: Any) -> Any:
    """``value`` with its tensors copied: what is kept is never the tensor a pipeline goes on to use."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_copied(item) for item in value)
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value


def _size(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_size(item) for item in value)
    return 0
