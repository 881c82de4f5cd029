"""The caption probe's labels say what each caption names, and nothing it leaves out."""

from __future__ import annotations

import torch

from shapes import dataset, detector
from shapes.probe import CAPTION_ATTRIBUTES, CAPTION_CLASSES, caption_labels


def test_caption_labels_name_what_each_caption_says() -> None:
    scenes = dataset.scenes(200, 3)
    labels = caption_labels(scenes)
    assert labels.shape == (200, len(CAPTION_ATTRIBUTES))
    for scene, row in zip(scenes, labels.tolist(), strict=True):
        decoded = {
            name: values[index]
            for (name, values), index in zip(CAPTION_ATTRIBUTES.items(), row, strict=True)
            if index < len(values)
        }
        assert decoded == detector.scene_attributes(scene)
    # Both "not said" classes occur, and every class index fits its attribute's logits.
    assert (labels < torch.tensor(CAPTION_CLASSES)).all()
    assert (labels[:, 3] == len(dataset.SIZES)).any() and (labels[:, 4] == len(dataset.POSITIONS)).any()
