"""The shape critic reads shape and size from latents, and its loss tells what a caption asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.models.builtin import SHAPES_FLUX_FOLDER
from shapes import dataset, evaluate
from shapes.critic import critic_loss, image_labels, train_critic
from shapes.options import Options
from shapes.probe import caption_labels
from shapes.vae import normalised_latents


@pytest.mark.slow
def test_the_critic_reads_shape_and_size_from_latents(tmp_path: Path) -> None:
    vae = evaluate.load(SHAPES_FLUX_FOLDER).vae
    scenes = dataset.scenes(2400, 5)
    latents = normalised_latents(vae, dataset.render_batch(scenes))
    opts = Options(out=tmp_path / "pipe", work=tmp_path, minutes=1, critic_steps=500)
    critic = train_critic(opts, latents, image_labels(scenes))
    assert not any(p.requires_grad for p in critic.parameters())

    # The first eighth is held out of its training.
    held_out, truth = latents[:300], image_labels(scenes[:300])
    with torch.no_grad():
        shape, size = critic(held_out)
    assert (shape.argmax(-1) == truth[:, 0]).float().mean() > 0.9
    assert (size.argmax(-1) == truth[:, 1]).float().mean() > 0.9

    # Its loss tells a latent that shows what the caption asks from one that does not.
    said = caption_labels(scenes[:300])
    other_shape = said.clone()
    other_shape[:, 0] = (said[:, 0] + 1) % len(dataset.SHAPES)
    with torch.no_grad():
        right, wrong = (
            critic_loss(critic, held_out, said),
            critic_loss(critic, held_out, other_shape),
        )
    assert right < 0.5 < wrong

    # A second run reuses the saved critic.
    again = train_critic(opts, latents, image_labels(scenes))
    with torch.no_grad():
        assert torch.equal(again(held_out)[0], shape)
