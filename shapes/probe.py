"""The caption probe: what each caption says, read back from the pooled CLIP embedding in training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from shapes import dataset, detector

# What each caption says, one class per attribute; the last class of size and position is "not said".
CAPTION_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": dataset.SHAPES,
    "fg": dataset.COLOUR_NAMES,
    "bg": dataset.COLOUR_NAMES,
    "size": tuple(dataset.SIZES),
    "position": tuple(dataset.POSITIONS),
}
CAPTION_CLASSES = [
    len(values) + (name in ("size", "position")) for name, values in CAPTION_ATTRIBUTES.items()
]


def caption_labels(scenes: Sequence[dataset.Scene]) -> torch.Tensor:
    """(n, 5) class indices of what each scene's caption names, in ``CAPTION_ATTRIBUTES`` order."""
    rows = []
    for scene in scenes:
        named = detector.scene_attributes(scene)
        rows.append(
            [
                values.index(named[name]) if name in named else len(values)
                for name, values in CAPTION_ATTRIBUTES.items()
            ]
        )
    return torch.tensor(rows, dtype=torch.long)


class CaptionProbe(torch.nn.Module):
    """A cosine classifier at a fixed scale: logits = 10 cos(embedding, class direction).

    A plain linear probe can reach a near-zero loss by growing its own weights while the embeddings
    of "circle" and "square" stay nearly parallel (cosine 0.90 after a full run with one). With the
    scale fixed, a confident answer for five attributes at once needs each one's classes to point
    apart in the embedding itself, and that embedding is what conditions the transformer.
    """

    SCALE = 10.0

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.directions = torch.nn.Parameter(torch.randn(classes, features))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.SCALE * F.normalize(embedding, dim=-1) @ F.normalize(self.directions, dim=-1).T


def probe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the attributes of the cross-entropy against ``caption_labels`` rows."""
    said = logits.split(CAPTION_CLASSES, dim=-1)
    total = sum((F.cross_entropy(part, labels[:, k]) for k, part in enumerate(said)), torch.zeros(()))
    return total / len(said)
