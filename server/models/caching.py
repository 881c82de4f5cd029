"""The cache engines of one resident pipeline, run as one under a request's policy.

A pipeline may hold several transformers (Wan 2.2's two experts): each gets its own engine, every one
of them runs under the request's policy, and the request's stats are their sum. A model served
without cache hooks has no engines: it supports no method and its sessions report no stats.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from cache_engine import CacheEngine, SessionStats


@dataclass
class CacheRun:
    """One request's sessions; ``stats`` is filled in when they end (None without engines)."""

    stats: SessionStats | None = None


class ModelCache:
    def __init__(self, engines: Sequence[CacheEngine]) -> None:
        self.engines = tuple(engines)

    @property
    def installed(self) -> bool:
        return bool(self.engines)

    @property
    def supported_methods(self) -> tuple[str, ...]:
        """The methods every engine supports, in the first engine's order."""
        if not self.engines:
            return ()
        first, *others = self.engines
        return tuple(
            method for method in first.supported_methods if all(method in e.supported_methods for e in others)
        )

    def fitted_defaults(self, method: str) -> dict[str, Any]:
        """What ``method`` runs with on these transformers where its reference defaults cannot act; the
        first engine's value wins where two differ (a pipeline's transformers share a family)."""
        fitted: dict[str, Any] = {}
        for engine in reversed(self.engines):
            fitted.update(engine.fitted_defaults(method))
        return fitted

    def check(self, config: object | None) -> None:
        """Raise ValueError (UnsupportedMethodError) unless ``config`` applies to every transformer."""
        for engine in self.engines:
            engine.check(config)

    @contextmanager
    def session(
        self, config: object | None, *, request_id: str | None = None, whole_blocks: bool = True
    ) -> Iterator[CacheRun]:
        run = CacheRun()
        with ExitStack() as stack:
            sessions = [
                stack.enter_context(engine.session(config, request_id=request_id, whole_blocks=whole_blocks))
                for engine in self.engines
            ]
            yield run
        if sessions:
            total = sessions[0].stats
            for session in sessions[1:]:
                total = total + session.stats
            run.stats = total

    def close(self) -> None:
        """Remove every engine's hooks: the pipeline runs exactly as diffusers ships it."""
        for engine in self.engines:
            engine.close()
        self.engines = ()
