"""Errors the engine raises to its callers."""

from __future__ import annotations

from .targets import ModelLayout


class UnsupportedMethodError(ValueError):
    """A caching method cannot act on this model: raised instead of silently doing nothing."""

    def __init__(self, method: str, layout: ModelLayout, reason: str) -> None:
        self.method = method
        self.family = layout.family.name
        self.model = type(layout.denoiser).__name__
        super().__init__(f"{method} is not supported on {self.model} (family {self.family}): {reason}")
