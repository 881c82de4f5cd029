"""The shipped checkpoint loads the way the server loads any model, and still draws what it is asked for."""

from __future__ import annotations

import numpy as np
import pytest

from server.models.builtin import BUILTIN_MODELS, SHAPES_FLUX_FOLDER
from server.models.generation import GenerationParams, generate
from server.models.registry import PRESET_NAMES, ResidentModel, load_model
from server.settings import DEFAULT_MODELS
from shapes import detector, evaluate

# Well under what the model scores at its default settings (docs/shapes-model.md), far above what
# noise or a broken loader gives (a random transformer gets the foreground colour right about 2% of
# the time; size is a coin toss, position one in five). Shape (0.61 over 200 prompts, 6 of these
# 12, chance 0.25) would leave a floor one image of margin; test_conditioning.py checks that the
# shape word is followed.
FLOORS = {"bg": 0.9, "fg": 0.8, "size": 0.75, "position": 0.75}
PROMPTS = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ResidentModel:
    return load_model("shapes-flux", cache_dir=tmp_path_factory.mktemp("cache"))


def test_checkpoint_is_a_small_pipeline_folder() -> None:
    files = [p for p in SHAPES_FLUX_FOLDER.rglob("*") if p.is_file()]
    assert (SHAPES_FLUX_FOLDER / "model_index.json") in files
    assert sum(p.stat().st_size for p in files) < 16 * 2**20


def test_it_is_the_default_image_model() -> None:
    images = [name for name in DEFAULT_MODELS if name != "tiny-wan"]
    assert images[0] == "shapes-flux"


def test_loaded_from_its_folder_with_its_call_settings(model: ResidentModel) -> None:
    assert model.source == "builtin:shapes-flux"
    assert (model.kind, model.family, type(model.pipeline).__name__) == ("image", "flux", "FluxPipeline")
    assert (model.defaults.width, model.defaults.height, model.defaults.steps) == (64, 64, 20)
    assert dict(model.call_kwargs) == {"max_sequence_length": 16}
    assert model.pipeline.default_sample_size * model.pipeline.vae_scale_factor == 64
    assert set(model.presets) == set(PRESET_NAMES)
    assert model.presets == BUILTIN_MODELS["shapes-flux"].presets()  # type: ignore[misc]


@pytest.mark.slow
def test_generations_follow_their_prompts(model: ResidentModel) -> None:
    scenes = evaluate.test_scenes(PROMPTS)
    images = []
    for seed, scene in enumerate(scenes):
        params = GenerationParams.from_defaults(model.defaults, prompt=scene.caption, seed=seed)
        result = generate(model, params)
        assert result.images is not None
        images.append(np.asarray(result.images[0].convert("RGB")))
    # Only what each prompt names: an object whose place the prompt leaves open may be anywhere.
    scores = evaluate.adherence(np.stack(images), [detector.scene_attributes(s) for s in scenes])
    for name, floor in FLOORS.items():
        assert scores[name] >= floor, scores
