"""The shipped checkpoint loads the way a real model does and still draws what it is asked for."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shapes import detector, evaluate

if TYPE_CHECKING:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

CHECKPOINT = Path(__file__).resolve().parents[2] / "server" / "assets" / "shapes-flux"
# Well under what the model scores (docs/shapes-model.md), far above what noise or a broken loader
# gives (a random transformer gets colours right about 2% of the time).
FLOORS = {"bg": 0.9, "fg": 0.75, "position": 0.7}


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return evaluate.load(CHECKPOINT)


def test_checkpoint_is_small() -> None:
    size = sum(p.stat().st_size for p in CHECKPOINT.rglob("*") if p.is_file())
    assert size < 16 * 2**20


@pytest.mark.slow
def test_generations_follow_their_prompts(pipe: FluxPipeline) -> None:
    scenes = evaluate.test_scenes(16)
    images = evaluate.generate(pipe, [s.caption for s in scenes], range(16))
    scores = evaluate.adherence(images, [detector.scene_attributes(s, all_attributes=True) for s in scenes])
    for name, floor in FLOORS.items():
        assert scores[name] >= floor, scores
