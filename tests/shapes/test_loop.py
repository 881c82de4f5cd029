"""The training step falls back to eager mode where torch.compile cannot work."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from shapes.denoiser import Denoiser, token_ids
from shapes.loop import compiled
from shapes.vae import LATENT_CHANNELS, LATENT_SIDE


def test_a_failing_compiler_falls_back_to_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake: a missing C++ compiler cannot be provoked on a machine that has one.
    def broken(model: torch.nn.Module) -> Callable[..., object]:
        def call(*args: torch.Tensor) -> object:
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = Denoiser(0).eval()
    step = compiled(model)
    clip_ids, t5_ids = token_ids(["a red circle on a blue background"])
    x, s = torch.randn(1, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE), torch.tensor([0.5])
    with torch.no_grad():
        got, want = step(x, s, clip_ids, t5_ids), model(x, s, clip_ids, t5_ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
