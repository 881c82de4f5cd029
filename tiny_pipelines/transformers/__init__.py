"""Every transformer class diffusers exports, built tiny and seeded, with the inputs of one denoiser call.

The engine's promise is checked over these: on every class, each method acts correctly or is refused
when the policy is checked (``tests/cache_engine/test_every_transformer.py``; ``python -m
benchmarks.coverage`` writes the table). The modules ``a_to_f``, ``g_to_m`` and ``m_to_z`` hold
``TRANSFORMERS``, one :class:`TinyTransformer` per class, alphabetically; ``catalog`` gathers them. A class
diffusers adds later is missing here, and the test fails until it is classified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

ModelT = TypeVar("ModelT", bound=nn.Module)

# Every call is made at batch 2, so that a method mixing up the rows of a batch shows.
BATCH = 2


@dataclass(frozen=True)
class TinyTransformer:
    """One transformer class, built tiny: ``build()`` returns the seeded model (eval, float32, CPU) and
    the keyword arguments of one call of its forward at batch 2 (``return_dict=False`` included where the
    forward takes it)."""

    class_name: str
    build: Callable[[], tuple[nn.Module, dict[str, Any]]]
    # The keyword holding the noisy latents, which a denoising loop changes from call to call.
    latent: str
    # The keyword holding the timestep, and the values a pipeline passes at the start and the end of
    # denoising (1000 for pipelines passing scheduler timesteps, 1 for those passing sigma-like values in
    # 0..1; some run their time upward, from 0 at pure noise).
    timestep: str | None
    timestep_start: float = 1000.0
    timestep_end: float = 0.0


def seeded_model(model_class: Callable[..., ModelT], **config: Any) -> ModelT:
    """``model_class(**config)`` in eval mode with the weights of seed 0, leaving the global random state
    as the caller had it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(**config)
    return model.eval()


def named_model(class_name: str, **config: Any) -> nn.Module:
    """``seeded_model`` of the diffusers class called ``class_name`` (looked up at run time: under mypy the
    top-level names are diffusers' placeholders)."""
    import diffusers

    model: nn.Module = seeded_model(getattr(diffusers, class_name), **config)
    return model


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def timesteps(value: float, *shape: int) -> torch.Tensor:
    """``value`` for every row of the batch (and every position of ``shape`` after it)."""
    return torch.full((BATCH, *shape), value)
