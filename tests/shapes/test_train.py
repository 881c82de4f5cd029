"""The training script runs end to end, writes a loadable pipeline, and resumes from its work folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shapes import evaluate, train


@pytest.mark.slow
def test_a_few_steps_end_to_end(tmp_path: Path) -> None:
    out, work = tmp_path / "pipe", tmp_path / "work"
    args = ["--out", str(out), "--work", str(work), "--minutes", "5", "--images", "16", "--batch", "4"]
    args += ["--transformer-batch", "4"]
    args += ["--vae-steps", "2", "--steps", "2", "--threads", "1"]
    assert train.main(args) == 0
    assert (out / "model_index.json").is_file()
    assert {"vae.pt", "latents.pt", "transformer.pt"} <= {p.name for p in work.iterdir()}

    pipe = evaluate.load(out)
    images = evaluate.generate(pipe, ["a red circle on a blue background"], [0], steps=2)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8

    # A second run with a higher cap picks up the saved state instead of starting over.
    assert train.main([*args[:-4], "--steps", "3", "--threads", "1"]) == 0
    import torch

    assert torch.load(work / "transformer.pt", weights_only=False)["step"] == 3
