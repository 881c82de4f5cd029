"""The training script runs end to end, writes a loadable pipeline, and resumes from its work folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from server.builtin_models import SHAPES_FLUX_FOLDER
from shapes import dataset, detector, evaluate, train


@pytest.mark.slow
def test_a_few_steps_end_to_end(tmp_path: Path) -> None:
    out, work = tmp_path / "pipe", tmp_path / "work"
    args = ["--out", str(out), "--work", str(work), "--minutes", "5", "--images", "16", "--batch", "4"]
    # Compiling costs more than the whole smoke run; the fallback is tested below.
    # The critic's loss from the first step, so that its path runs too.
    args += ["--transformer-batch", "4", "--no-compile", "--critic-from", "0"]
    args += ["--vae-steps", "2", "--steps", "2", "--threads", "1"]
    assert train.main(args) == 0
    assert (out / "model_index.json").is_file()
    assert {"vae.pt", "latents.pt", "critic.pt", "transformer.pt"} <= {p.name for p in work.iterdir()}

    pipe = evaluate.load(out)
    images = evaluate.generate(pipe, ["a red circle on a blue background"], [0], steps=2)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8

    # A second run with a higher cap picks up the saved state instead of starting over.
    assert train.main([*args[:-4], "--steps", "3", "--threads", "1"]) == 0
    assert torch.load(work / "transformer.pt", weights_only=False)["step"] == 3


def test_caption_labels_name_what_each_caption_says() -> None:
    scenes = dataset.scenes(200, 3)
    labels = train.caption_labels(scenes)
    assert labels.shape == (200, len(train.CAPTION_ATTRIBUTES))
    for scene, row in zip(scenes, labels.tolist(), strict=True):
        decoded = {
            name: values[index]
            for (name, values), index in zip(train.CAPTION_ATTRIBUTES.items(), row, strict=True)
            if index < len(values)
        }
        assert decoded == detector.scene_attributes(scene)
    # Both "not said" classes occur, and every class index fits its attribute's logits.
    assert (labels < torch.tensor(train.CAPTION_CLASSES)).all()
    assert (labels[:, 3] == len(dataset.SIZES)).any() and (labels[:, 4] == len(dataset.POSITIONS)).any()


def test_a_failing_compiler_falls_back_to_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake: a missing C++ compiler cannot be provoked on a machine that has one.
    def broken(model: torch.nn.Module) -> Callable[..., object]:
        def call(*args: torch.Tensor) -> object:
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = train.Denoiser(0).eval()
    step = train.compiled(model)
    clip_ids, t5_ids = train.token_ids(["a red circle on a blue background"])
    x, s = torch.randn(1, train.LATENT_CHANNELS, train.LATENT_SIDE, train.LATENT_SIDE), torch.tensor([0.5])
    with torch.no_grad():
        got, want = step(x, s, clip_ids, t5_ids), model(x, s, clip_ids, t5_ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_clean_estimate_undoes_the_noising() -> None:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    generator = torch.Generator().manual_seed(0)
    shape = (3, train.LATENT_CHANNELS, train.LATENT_SIDE, train.LATENT_SIDE)
    x0, eps = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    s = torch.tensor([0.1, 0.5, 0.9])
    noisy = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
    velocity = FluxPipeline._pack_latents(
        eps - x0, 3, train.LATENT_CHANNELS, train.LATENT_SIDE, train.LATENT_SIDE
    )
    assert torch.allclose(train.clean_estimate(noisy, s, velocity), x0, atol=1e-5)


@pytest.mark.slow
def test_the_critic_reads_shape_and_size_from_latents(tmp_path: Path) -> None:
    vae = evaluate.load(SHAPES_FLUX_FOLDER).vae
    scenes = dataset.scenes(2400, 5)
    latents = train.normalised_latents(vae, dataset.render_batch(scenes))
    opts = train.Options(out=tmp_path / "pipe", work=tmp_path, minutes=1, critic_steps=500)
    critic = train.train_critic(opts, latents, train.image_labels(scenes))
    assert not any(p.requires_grad for p in critic.parameters())

    # The first eighth is held out of its training.
    held_out, truth = latents[:300], train.image_labels(scenes[:300])
    with torch.no_grad():
        shape, size = critic(held_out)
    assert (shape.argmax(-1) == truth[:, 0]).float().mean() > 0.9
    assert (size.argmax(-1) == truth[:, 1]).float().mean() > 0.9

    # Its loss tells a latent that shows what the caption asks from one that does not.
    said = train.caption_labels(scenes[:300])
    other_shape = said.clone()
    other_shape[:, 0] = (said[:, 0] + 1) % len(dataset.SHAPES)
    with torch.no_grad():
        right, wrong = (
            train.critic_loss(critic, held_out, said),
            train.critic_loss(critic, held_out, other_shape),
        )
    assert right < 0.5 < wrong

    # A second run reuses the saved critic.
    again = train.train_critic(opts, latents, train.image_labels(scenes))
    with torch.no_grad():
        assert torch.equal(again(held_out)[0], shape)
