"""Errors the engine raises to its callers."""

from __future__ import annotations

from .targets import ModelLayout


class InvalidConfigValue(ValueError):
    """A cache config was given a value it cannot take; ``field`` names the parameter at fault.

    A ValueError, as the reference's configs raise, so callers that catch ValueError still work.
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[object, ...]:
        # The keyword-only field is not in ``args``, which is all pickle would pass back otherwise.
        return (_rebuild_invalid_config_value, (type(self), str(self), self.field))


def _rebuild_invalid_config_value(
    cls: type[InvalidConfigValue], message: str, field: str
) -> InvalidConfigValue:
    return cls(message, field=field)


class UnsupportedMethodError(ValueError):
    """A caching method cannot act on this model: raised instead of silently doing nothing."""

    def __init__(self, method: str, layout: ModelLayout, reason: str) -> None:
        self.method = method
        self.family = layout.family.name
        self.model = type(layout.denoiser).__name__
        super().__init__(f"{method} is not supported on {self.model} (family {self.family}): {reason}")


def require_block_chain(method: str, layout: ModelLayout) -> None:
    """Refuse ``method``, which replays residuals spanning blocks, where the table says that is wrong."""
    if layout.chain_problem is not None:
        raise UnsupportedMethodError(method, layout, layout.chain_problem)
