"""The shape critic: a classifier that reads shape and size from a latent, trained once and frozen, whose
loss on the transformer's clean-latent estimate teaches the transformer what a shape word means."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from shapes import dataset
from shapes.options import Options
from shapes.progress import atomic_save, log
from shapes.vae import LATENT_CHANNELS


class LatentCritic(torch.nn.Module):
    """Reads an image's shape and size from its normalised latent: (n, 8, 16, 16) -> (n, 4 + 2) logits.

    Trained on the training latents, then frozen; training only (the pipeline never sees it). It reads
    latents rather than pixels because the latents keep what the VAE's decoder loses of a small star:
    on clean held-out latents it is right about 99.9% of the time, small shapes included.
    """

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.net = torch.nn.Sequential(
            conv(LATENT_CHANNELS, 32, 3, padding=1),
            torch.nn.SiLU(),
            conv(32, 32, 3, padding=1),
            torch.nn.SiLU(),
            conv(32, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(),
            conv(64, 64, 3, padding=1),
            torch.nn.SiLU(),
            conv(64, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(),
            # Averaged over the image: the object is read wherever it is placed.
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(64, len(dataset.SHAPES) + len(dataset.SIZES)),
        )

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape logits and size logits."""
        shape, size = self.net(latents).split((len(dataset.SHAPES), len(dataset.SIZES)), dim=-1)
        return shape, size


def image_labels(scenes: Sequence[dataset.Scene]) -> torch.Tensor:
    """(n, 2): each image's shape and size, whether or not its caption names them."""
    shapes, sizes = list(dataset.SHAPES), list(dataset.SIZES)
    return torch.tensor([[shapes.index(s.shape), sizes.index(s.size)] for s in scenes], dtype=torch.long)


def train_critic(opts: Options, latents: torch.Tensor, labels: torch.Tensor) -> LatentCritic:
    """``critic_steps`` steps on the clean latents, with Gaussian noise of a random strength (up to 0.5)
    so that it also reads the softer latents a half-trained transformer estimates."""
    path = opts.work / "critic.pt"
    torch.manual_seed(opts.seed + 2)
    critic = LatentCritic()
    if path.exists():
        saved = torch.load(path, weights_only=False)
        critic.load_state_dict(saved["state"])
        log(f"critic: reusing {path} (held-out accuracy {saved['accuracy']:.3f})")
    else:
        start = time.monotonic()
        held_out = min(2000, len(latents) // 8)
        train_latents, train_labels = latents[held_out:], labels[held_out:]
        generator = torch.Generator().manual_seed(opts.seed + 2)
        optimizer = torch.optim.AdamW(critic.parameters(), lr=2e-3, weight_decay=0.05)
        steps = opts.critic_steps if opts.steps is None else min(opts.critic_steps, opts.steps)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
            index = torch.randint(len(train_latents), (128,), generator=generator)
            x = train_latents[index].float()
            strength = 0.5 * torch.rand(len(x), 1, 1, 1, generator=generator)
            x = x + strength * torch.randn(x.shape, generator=generator)
            shape, size = critic(x)
            wanted = train_labels[index]
            loss = F.cross_entropy(shape, wanted[:, 0]) + F.cross_entropy(size, wanted[:, 1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        critic.eval()
        with torch.no_grad():
            shape, size = critic(latents[:held_out].float())
        right = (shape.argmax(-1) == labels[:held_out, 0]) & (size.argmax(-1) == labels[:held_out, 1])
        accuracy = right.float().mean().item()
        log(f"critic: {steps} steps in {time.monotonic() - start:.0f}s, held-out accuracy {accuracy:.3f}")
        atomic_save({"state": critic.state_dict(), "accuracy": accuracy}, path)
    critic.eval().requires_grad_(False)
    return critic


def critic_loss(critic: LatentCritic, estimate: torch.Tensor, said: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the critic's reading of ``estimate`` (clean latents the transformer predicts)
    against what the captions ask: ``said`` holds ``shapes.probe.caption_labels`` rows.

    The size term, where the caption names a size, holds sizes in place: a critic of shape alone
    pulls toward large shapes, which it reads more easily, and small ones come out large (size 0.89
    against 0.99 without a critic).
    """
    shape, size = critic(estimate)
    loss = F.cross_entropy(shape, said[:, 0])
    named = said[:, 3] < len(dataset.SIZES)
    if named.any():
        loss = loss + F.cross_entropy(size[named], said[named, 3])
    return loss
