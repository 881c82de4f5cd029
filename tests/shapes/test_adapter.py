"""The outline adapter: the dataset's outlined renders, the training command, and the adapter that ships
beside shapes-flux."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from server.models.adapters import Adapters
from server.models.builtin import SHAPES_FLUX_FOLDER, SHAPES_FLUX_OUTLINE_FOLDER
from shapes import adapter, dataset, detector, evaluate


def test_outlined_renders_read_hollow_and_filled_ones_never() -> None:
    scenes = dataset.scenes(100, 3)
    filled = [detector.hollow_share(dataset.render(scene)) for scene in scenes]
    outlined = [detector.hollow_share(dataset.render(scene, outlined=True)) for scene in scenes]
    assert max(filled) == 0.0
    # Small stars and triangles enclose little inside a 3-pixel stroke; a shape cut by the frame none.
    assert sum(value >= 0.1 for value in outlined) >= 85
    assert np.mean(outlined) > 0.3


def test_an_outlined_render_keeps_the_scene_but_its_inside() -> None:
    scene = dataset.Scene(
        shape="square", fg="red", bg="blue", size="large", position="center",
        fg_rgb=dataset.COLOURS["red"], bg_rgb=dataset.COLOURS["blue"], cx=32.0, cy=32.0, r=16.0,
    )  # fmt: skip
    filled, outlined = dataset.render(scene), dataset.render(scene, outlined=True)
    assert tuple(filled[32, 32]) == dataset.COLOURS["red"]
    assert tuple(outlined[32, 32]) == dataset.COLOURS["blue"]
    # The edge (half-side 0.9 r from the centre) is drawn in both.
    assert tuple(outlined[32, 32 - 14]) == tuple(filled[32, 32 - 14]) == dataset.COLOURS["red"]
    assert detector.detect(outlined).fg == "red" and detector.detect(outlined).bg == "blue"


@pytest.mark.slow
def test_training_writes_an_adapter_diffusers_and_the_server_read(tmp_path: Path) -> None:
    out = tmp_path / "outline"
    args = ["--model", str(SHAPES_FLUX_FOLDER), "--out", str(out), "--images", "32", "--batch", "4"]
    assert adapter.main([*args, "--steps", "3", "--rank", "4", "--threads", "1"]) == 0

    evaluate.load(SHAPES_FLUX_FOLDER).load_lora_weights(out, adapter_name="outline")
    base = evaluate.load(SHAPES_FLUX_FOLDER)
    served = Adapters(base).load("outline", str(out))
    # PEFT's rule: a target names a module's path or its last parts.
    targeted = {
        path
        for path, module in base.transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and any(path == name or path.endswith("." + name) for name in adapter.TARGET_MODULES)
    }
    # Every linear layer of the attention and feed-forward paths, at the rank asked for; B moved off zero.
    assert set(served.modules) == targeted
    assert served.rank == 4
    assert any(pair.up.abs().sum() > 0 for pair in served.modules.values())


def test_the_shipped_adapter_draws_outlines_the_base_model_never_does() -> None:
    """Through diffusers' own ``load_lora_weights``: the file ships in the format every tool reads."""
    prompts = [scene.caption for scene in evaluate.test_scenes(12)]
    seeds = list(range(len(prompts)))
    pipe = evaluate.load(SHAPES_FLUX_FOLDER)
    base = evaluate.generate(pipe, prompts, seeds, cfg=3.0)
    pipe.load_lora_weights(SHAPES_FLUX_OUTLINE_FOLDER, adapter_name="outline")
    outlined = evaluate.generate(pipe, prompts, seeds, cfg=3.0)
    assert [detector.hollow_share(image) for image in base] == [0.0] * len(prompts)
    assert sum(detector.hollow_share(image) >= 0.1 for image in outlined) >= 3
