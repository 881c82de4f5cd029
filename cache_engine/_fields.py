"""Config fields that carry their own description, read back with ``dataclasses.fields``."""

from __future__ import annotations

import dataclasses
from typing import Any


def documented(default: Any, doc: str) -> Any:
    """A dataclass field defaulting to ``default``, whose meaning ``doc`` is kept in its metadata
    (``dataclasses.fields(cls)`` ... ``.metadata["doc"]``): the one place a field is described."""
    return dataclasses.field(default=default, metadata={"doc": doc})
