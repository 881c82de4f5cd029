"""What every training stage shares: log lines, stopping at a step boundary on a signal, saving
progress without leaving a torn file, and a learning-rate schedule over the stage's time."""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cosine_lr(peak: float, warmup: int, step: int, progress: float) -> float:
    """Linear warmup, then cosine down to 5% of the peak as ``progress`` goes from 0 to 1.

    Progress is the share of the stage's time used, not of a step count: the budget is wall-clock.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def clipped_step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor, smoothed: float
) -> float:
    """One optimiser step on ``loss``, its gradients clipped to norm 1; returns the loss's running mean
    (``smoothed``, nan before the first step)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.item() if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * loss.item()


class Stop:
    """Set by SIGTERM / SIGINT while training, so the loop stops at a step boundary and saves."""

    requested = False

    @classmethod
    @contextmanager
    def on_signals(cls) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            cls.requested = True

        cls.requested = False
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` beside ``path``, then renamed over it: a killed run leaves the previous state."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
