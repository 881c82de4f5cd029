"""The training command runs end to end, writes a loadable pipeline, and resumes from its work folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shapes import evaluate, train


@pytest.mark.slow
def test_a_few_steps_end_to_end(tmp_path: Path) -> None:
    out, work = tmp_path / "pipe", tmp_path / "work"
    args = ["--out", str(out), "--work", str(work), "--minutes", "5", "--images", "16", "--batch", "4"]
    # Compiling costs more than the whole smoke run; the fallback is tested in test_loop.py.
    # The critic's loss from the first step, so that its path runs too.
    args += ["--transformer-batch", "4", "--no-compile", "--critic-from", "0"]
    args += ["--vae-steps", "2", "--steps", "2", "--threads", "1"]
    assert train.main(args) == 0
    assert (out / "model_index.json").is_file()
    assert {"vae.pt", "decoder.pt", "latents.pt", "critic.pt", "transformer.pt"} <= {
        p.name for p in work.iterdir()
    }

    pipe = evaluate.load(out)
    images = evaluate.generate(pipe, ["a red circle on a blue background"], [0], steps=2)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8

    # A second run with a higher cap picks up the saved state instead of starting over.
    assert train.main([*args[:-4], "--steps", "3", "--threads", "1"]) == 0
    assert torch.load(work / "transformer.pt", weights_only=False)["step"] == 3


def test_every_flag_reaches_the_options(tmp_path: Path) -> None:
    flags = ["--out", str(tmp_path / "pipe"), "--minutes", "3", "--seed", "7", "--images", "100"]
    flags += ["--vae-share", "0.1", "--decoder-share", "0.3", "--checkpoint-minutes", "2"]
    flags += ["--vae-steps", "5", "--steps", "6", "--threads", str(torch.get_num_threads())]
    flags += ["--log-every", "9", "--batch", "8", "--transformer-batch", "12", "--lr", "2e-3"]
    flags += ["--noise-mean", "0.5", "--caption-loss", "0", "--shape-loss", "0.2", "--critic-from", "0.5"]
    flags += ["--critic-steps", "40", "--no-compile"]
    opts = train.parse(flags)
    assert opts == train.Options(
        out=tmp_path / "pipe",
        work=tmp_path / "pipe.work",
        minutes=3,
        seed=7,
        images=100,
        vae_share=0.1,
        decoder_share=0.3,
        checkpoint_minutes=2,
        vae_steps=5,
        steps=6,
        log_every=9,
        batch=8,
        transformer_batch=12,
        lr=2e-3,
        noise_mean=0.5,
        caption_loss=0,
        shape_loss=0.2,
        critic_from=0.5,
        critic_steps=40,
        compile=False,
    )


def test_help_describes_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        train.main(["--help"])
    assert stopped.value.code == 0
    assert "python -m shapes.train" in capsys.readouterr().out
