"""The registry: built-in names, local folders and bad specs, and what it says about each model."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.models.builtin import BUILTIN_MODELS
from server.models.generation import GenerationParams, generate
from server.models.registry import (
    PRESET_NAMES,
    ModelDefaults,
    ModelLimits,
    ModelLoadError,
    load_model,
)


@pytest.mark.parametrize(
    ("name", "kind", "family", "size_multiple", "frame_step"),
    [("tiny-flux", "image", "flux", 8, 1), ("tiny-wan", "video", "wan", 16, 4)],
)
def test_builtin_model_is_described(
    name: str, kind: str, family: str, size_multiple: int, frame_step: int, tmp_path: Path
) -> None:
    model = load_model(name, cache_dir=tmp_path)
    entry = BUILTIN_MODELS[name]
    assert (model.name, model.kind, model.family) == (name, kind, family)
    # The spec the operator gave, not where the server keeps the folder.
    assert model.source == f"builtin:{name}"
    assert (tmp_path / "builtin" / f"{name}-{entry.fingerprint()}").is_dir()
    assert type(model.pipeline).__name__ == type(entry.build()).__name__
    (engine,) = model.cache.engines
    assert engine.transformer is model.pipeline.transformer
    assert model.supported_methods == engine.supported_methods
    assert (model.defaults, model.limits, dict(model.call_kwargs)) == (
        entry.defaults,
        entry.limits,
        {"max_sequence_length": 16},
    )
    assert (model.size_multiple, model.frame_step) == (size_multiple, frame_step)
    assert model.defaults.width % size_multiple == 0 and model.defaults.height % size_multiple == 0
    assert set(model.presets) == set(PRESET_NAMES)
    for config in model.presets.values():
        model.cache.check(config)
    assert model.pipeline.device.type == "cpu"
    assert all(p.dtype.is_floating_point for p in model.pipeline.transformer.parameters())


def test_local_folder_loads_like_a_hub_model(tmp_path: Path) -> None:
    folder = tmp_path / "my-wan"
    BUILTIN_MODELS["tiny-wan"].build().save_pretrained(folder)

    model = load_model(str(folder), cache_dir=tmp_path / "cache")

    assert (model.name, model.source, model.kind, model.family) == (
        "my-wan",
        f"local:{folder}",
        "video",
        "wan",
    )
    # Not a built-in: the family's published defaults, no fixed call kwargs.
    assert model.defaults == ModelDefaults(832, 480, 81, 50, 5.0, 16)
    assert isinstance(model.limits, ModelLimits) and model.limits.max_frames == 81
    assert dict(model.call_kwargs) == {}
    assert not (tmp_path / "cache").exists()
    result = generate(
        model,
        GenerationParams(
            prompt="a boat on the sea",
            negative_prompt=None,
            width=32,
            height=16,
            num_frames=5,
            steps=2,
            guidance_scale=1.0,
            seed=0,
            n=1,
        ),
    )
    assert result.videos is not None and [frame.size for frame in result.videos[0]] == [(32, 16)] * 5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-model", "not a built-in model"),
        ("./not/a/folder/at/all", "not a built-in model"),
    ],
)
def test_unknown_spec_is_a_load_error(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec, cache_dir=tmp_path)


def test_folder_without_a_pipeline_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load a diffusers pipeline"):
        load_model(str(tmp_path / "empty"), cache_dir=tmp_path)


def test_unknown_dtype_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("tiny-wan", dtype="float8", cache_dir=tmp_path)
    assert not (tmp_path / "builtin").exists()
