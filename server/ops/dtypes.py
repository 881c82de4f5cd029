"""How the wire and the command line name torch dtypes: ``"bfloat16"`` for ``torch.bfloat16``."""

from __future__ import annotations

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """The wire's name of ``dtype``: ``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype the wire's ``name`` stands for; the inverse of ``dtype_name``."""
    dtype: torch.dtype = getattr(torch, name)
    return dtype
