"""Config checks shared by the methods (each raises InvalidConfigValue for its field), and identifier matching."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch

from .errors import InvalidConfigValue


def positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfigValue(f"{name} must be a positive integer, got {value!r}", field=name)


def non_negative_int(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidConfigValue(f"{name} must be a non-negative integer, got {value!r}", field=name)


def number(name: str, value: Any, *, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidConfigValue(f"{name} must be a number, got {value!r}", field=name)
    # NaN compares false with everything, so a NaN threshold or weight would silently change behaviour.
    if not math.isfinite(value):
        raise InvalidConfigValue(f"{name} must be finite, got {value!r}", field=name)
    if minimum is not None and value < minimum:
        raise InvalidConfigValue(f"{name} must be >= {minimum}, got {value!r}", field=name)


def optional_dtype(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, torch.dtype):
        raise InvalidConfigValue(f"{name} must be a torch.dtype or None, got {value!r}", field=name)


def timestep_range(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidConfigValue(f"{name} must be a (low, high) pair, got {value!r}", field=name)
    low, high = value
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise InvalidConfigValue(f"{name} bounds must be numbers, got {value!r}", field=name)
        if math.isnan(bound):
            raise InvalidConfigValue(f"{name} bounds must not be NaN, got {value!r}", field=name)
    if low > high:
        raise InvalidConfigValue(f"{name} must have low <= high, got {value!r}", field=name)
    return (low, high)


def patterns(name: str, value: Any, *, optional: bool = False) -> tuple[str, ...] | None:
    if value is None and optional:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidConfigValue(f"{name} must be a list of regular expressions, got {value!r}", field=name)
    result = tuple(value)
    for pattern in result:
        if not isinstance(pattern, str):
            raise InvalidConfigValue(f"{name} must contain strings, got {pattern!r}", field=name)
        try:
            re.compile(pattern)
        except re.error as error:
            raise InvalidConfigValue(
                f"{name} has an invalid regular expression {pattern!r}: {error}", field=name
            ) from None
    return result


def search_any(identifiers: tuple[str, ...], name: str) -> bool:
    """Whether any identifier matches somewhere in ``name`` (the reference's ``re.search`` rule)."""
    return any(re.search(identifier, name) is not None for identifier in identifiers)


def callback(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise InvalidConfigValue(f"{name} must be callable or None, got {value!r}", field=name)
