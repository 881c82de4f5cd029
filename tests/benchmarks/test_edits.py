"""Smoke test of ``python -m benchmarks.edits``: it runs end to end on a few scenes, and what it measures
holds where it cannot depend on the model's skill (inpainting keeps the pixels outside its mask)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import edits
from server.models.registry import load_model
from shapes import dataset


@pytest.mark.slow
def test_a_short_run_scores_each_edit_and_keeps_the_pixels_outside_the_mask(tmp_path: Path) -> None:
    model = load_model("shapes-flux", cache_dir=tmp_path)
    done = edits.run(model, n=3, strength=0.8, margin=3.0, steps=4)
    assert [len(items) for items in done.values()] == [3, 3]
    for edit in done["inpainting"]:
        assert edit.outside_psnr is not None and math.isinf(edit.outside_psnr)
        assert edit.asked not in (edit.scene.fg, edit.scene.bg) and edit.asked in edit.prompt
    assert "| image_to_image | 3 |" in edits.table(done)
    edits.picture(done, 2, tmp_path / "edits.png")
    assert (tmp_path / "edits.png").stat().st_size > 0


def test_the_mask_covers_the_object_and_is_transparent_where_to_change() -> None:
    scene = dataset.scenes(1, edits.EDIT_SEED)[0]
    inside = edits.object_mask(scene, margin=0.0)
    drawn = dataset.render(scene).astype(int)
    assert np.all(np.abs(drawn[~inside] - np.array(scene.bg_rgb)).max(axis=-1) <= 1)
    alpha = np.asarray(edits.alpha_mask(inside))[..., 3]
    assert np.array_equal(alpha == 0, inside)
