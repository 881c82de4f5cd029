"""Fixtures of the engine's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from tests.cache_engine.pipelines import run
from tests.cache_engine.support import RigFactory, rigs, tiny


@pytest.fixture(scope="package", autouse=True)
def _quiet_diffusers() -> Iterator[None]:
    # The tiny pipelines trigger harmless warnings (no tokenizer, fp32 hints) on every call.
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(previous)


@pytest.fixture(scope="session")
def uncached() -> Callable[[str, str | None], torch.Tensor]:
    """The output of a pipeline no cache code ever touched, computed once per (family, cfg)."""
    found: dict[tuple[str, str | None], torch.Tensor] = {}

    def get(family: str, cfg: str | None = None) -> torch.Tensor:
        if (family, cfg) not in found:
            found[(family, cfg)] = run(tiny(family, cfg))
        return found[(family, cfg)]

    return get


@pytest.fixture(scope="module")
def rig() -> Iterator[RigFactory]:
    """Each module's rigs, built on first use and closed when its tests are done."""
    with rigs() as get:
        yield get
