"""Counters of what the server did; a place for the Prometheus exporter to plug into.

For now the counts stay in memory (``snapshot`` reads them); exporting them is a later change that
only this module needs.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

from .protocol import Timings


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generations: Counter[tuple[str, str, str]] = Counter()
        self._denoising_ms: defaultdict[str, float] = defaultdict(float)

    def generation_done(self, model: str, method: str, outcome: str, timings: Timings | None) -> None:
        """``outcome`` is "ok" or the name of the exception that ended the generation."""
        with self._lock:
            self._generations[(model, method, outcome)] += 1
            if timings is not None:
                self._denoising_ms[model] += timings.denoising

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "generations": {"/".join(key): count for key, count in self._generations.items()},
                "denoising_ms": dict(self._denoising_ms),
            }
