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
from typing import Any

from torch import nn


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
