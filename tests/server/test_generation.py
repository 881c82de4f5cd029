"""generate() on the built-in models: shapes, determinism, conditioning, steps, timings, exactness."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from server.models.generation import (
    GenerationParams,
    GenerationResult,
    InvalidGenerationParams,
    check_params,
    generate,
)
from server.models.limits import ModelDefaults
from server.models.registry import ResidentModel, load_model
from server.models.stages import STAGES, StageProbe


@pytest.fixture(scope="module")
def flux(model_cache: Path) -> ResidentModel:
    return load_model("tiny-flux", cache_dir=model_cache)


@pytest.fixture(scope="module")
def wan(model_cache: Path) -> ResidentModel:
    return load_model("tiny-wan", cache_dir=model_cache)


@pytest.fixture(params=["tiny-flux", "tiny-wan"])
def model(request: pytest.FixtureRequest) -> ResidentModel:
    fixture = "flux" if request.param == "tiny-flux" else "wan"
    resident: ResidentModel = request.getfixturevalue(fixture)
    return resident


def params_for(model: ResidentModel, **changes: Any) -> GenerationParams:
    return GenerationParams.from_defaults(
        model.defaults,
        **{"prompt": "a small red circle at the top on a blue background", "steps": 4, "seed": 7, **changes},
    )


def frames(result: GenerationResult) -> list[Image.Image]:
    """Every image of the result, videos flattened frame by frame."""
    if result.images is not None:
        return list(result.images)
    assert result.videos is not None
    return [frame for video in result.videos for frame in video]


def pixels(result: GenerationResult) -> np.ndarray:
    return np.stack([np.asarray(frame) for frame in frames(result)])


# -- params from a model's defaults ----------------------------------------------------------------------


def test_params_from_defaults_take_every_default_and_each_override() -> None:
    # No two defaults alike, so that a field read from the wrong one shows.
    defaults = ModelDefaults(width=48, height=32, num_frames=9, steps=5, guidance_scale=2.5, fps=12)
    assert GenerationParams.from_defaults(defaults, prompt="a cat") == GenerationParams(
        prompt="a cat",
        negative_prompt=None,
        width=48,
        height=32,
        num_frames=9,
        steps=5,
        guidance_scale=2.5,
        seed=0,
        n=1,
        fps=12,
    )
    changed = GenerationParams.from_defaults(defaults, prompt="a cat", steps=2, seed=7, negative_prompt="fog")
    assert (changed.steps, changed.seed, changed.negative_prompt, changed.width) == (2, 7, "fog", 48)
    with pytest.raises(TypeError):
        GenerationParams.from_defaults(defaults, prompt="a cat", colour="red")


# -- shapes ---------------------------------------------------------------------------------------------


def test_flux_returns_n_images_of_the_requested_size(flux: ResidentModel) -> None:
    result = generate(flux, params_for(flux, width=64, height=32, n=3))
    assert result.videos is None and result.images is not None
    assert [(image.size, image.mode) for image in result.images] == [((64, 32), "RGB")] * 3


def test_wan_returns_n_videos_of_the_requested_size_and_length(wan: ResidentModel) -> None:
    result = generate(wan, params_for(wan, width=48, height=32, num_frames=9, n=2))
    assert result.images is None and result.videos is not None
    assert len(result.videos) == 2
    for video in result.videos:
        assert [(frame.size, frame.mode) for frame in video] == [((48, 32), "RGB")] * 9


# -- determinism and conditioning -----------------------------------------------------------------------


def test_same_seed_same_pixels_and_other_seed_other_pixels(model: ResidentModel) -> None:
    first = pixels(generate(model, params_for(model)))
    assert np.array_equal(first, pixels(generate(model, params_for(model))))
    assert not np.array_equal(first, pixels(generate(model, params_for(model, seed=8))))


def test_the_prompt_conditions_the_output(model: ResidentModel) -> None:
    red = pixels(generate(model, params_for(model, prompt="a red cat")))
    blue = pixels(generate(model, params_for(model, prompt="a blue dog")))
    assert not np.array_equal(red, blue)


def test_the_n_outputs_differ_from_each_other(flux: ResidentModel) -> None:
    first, second = pixels(generate(flux, params_for(flux, n=2)))
    assert not np.array_equal(first, second)


def test_negative_prompt_acts_only_under_guidance(model: ResidentModel) -> None:
    def run(negative: str | None, guidance: float) -> np.ndarray:
        return pixels(generate(model, params_for(model, negative_prompt=negative, guidance_scale=guidance)))

    assert np.array_equal(run(None, 1.0), run("a green tree", 1.0))
    assert not np.array_equal(run(None, 4.0), run("a green tree", 4.0))
    assert not np.array_equal(run(None, 1.0), run(None, 4.0))


def _one_call(model: ResidentModel, params: GenerationParams) -> list[Image.Image]:
    """The same generation as one plain pipeline call, as its documentation shows it."""
    pipe: Any = model.pipeline  # DiffusionPipeline declares no __call__; each pipeline defines its own
    common = {
        "prompt": params.prompt,
        "height": params.height,
        "width": params.width,
        "num_inference_steps": params.steps,
        "generator": torch.Generator("cpu").manual_seed(params.seed),
        "output_type": "pil",
        **model.call_kwargs,
    }
    if model.kind == "image":
        guided = {"negative_prompt": params.negative_prompt or "", "true_cfg_scale": params.guidance_scale}
        return list(
            pipe(
                **common, **(guided if params.guidance_scale > 1 else {}), num_images_per_prompt=params.n
            ).images
        )
    videos = pipe(
        **common,
        negative_prompt=params.negative_prompt,
        num_frames=params.num_frames,
        guidance_scale=params.guidance_scale,
        num_videos_per_prompt=params.n,
    ).frames
    return [frame for video in videos for frame in video]


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_staged_generation_is_bit_identical_to_one_pipeline_call(
    model: ResidentModel, guidance_scale: float
) -> None:
    params = params_for(model, guidance_scale=guidance_scale, negative_prompt="a dark night", n=2)
    expected = _one_call(model, params)
    got = frames(generate(model, params))
    assert len(got) == len(expected)
    for image, reference in zip(got, expected, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(reference))


# -- steps and timings ----------------------------------------------------------------------------------


def test_on_step_end_sees_every_step_and_timings_are_reported(model: ResidentModel) -> None:
    seen: list[int] = []
    result = generate(model, params_for(model, steps=5), on_step_end=seen.append)
    assert seen == [0, 1, 2, 3, 4]
    assert len(result.step_times_ms) == 5 and all(ms > 0 for ms in result.step_times_ms)
    # Text encoders and the VAE are timed by their own calls, the steps by the callback.
    assert set(result.timings_ms) == set(STAGES) and all(ms > 0 for ms in result.timings_ms.values())
    assert sum(result.step_times_ms) == pytest.approx(result.timings_ms["denoising"])


class _Stop(Exception):
    pass


def test_raising_from_on_step_end_stops_the_pipeline(model: ResidentModel) -> None:
    seen: list[int] = []

    def stop_at_two(step: int) -> None:
        seen.append(step)
        if step == 2:
            raise _Stop

    with pytest.raises(_Stop):
        generate(model, params_for(model, steps=6), on_step_end=stop_at_two)
    assert seen == [0, 1, 2]
    # The interrupted run left nothing behind that changes the next one.
    counted: list[int] = []
    after = generate(model, params_for(model, steps=6), on_step_end=counted.append)
    assert counted == list(range(6))
    assert np.array_equal(pixels(after), pixels(generate(model, params_for(model, steps=6))))


# -- steps observed by the denoiser's calls --------------------------------------------------------------


def _observed_by_denoiser(model: ResidentModel) -> ResidentModel:
    """``model`` as a pipeline without a step callback is run: its steps seen by the denoiser's calls."""
    spec = dataclasses.replace(model.call_spec, steps_observed_by="denoiser")
    probe = StageProbe(model.pipeline, [model.pipeline.transformer], "denoiser")
    return dataclasses.replace(model, call_spec=spec, stages=probe)


def test_steps_seen_by_the_denoiser_match_the_callback(model: ResidentModel) -> None:
    observed = _observed_by_denoiser(model)
    # Guidance on, so that Wan's two CFG passes per step must count as one step.
    params = params_for(model, n=2, guidance_scale=3.0)
    seen: list[int] = []
    result = generate(observed, params, on_step_end=seen.append)
    assert seen == list(range(params.steps))
    assert len(result.step_times_ms) == params.steps
    assert set(result.timings_ms) == set(STAGES)
    assert np.array_equal(pixels(result), pixels(generate(model, params)))

    def stop_at_one(step: int) -> None:
        if step == 1:
            raise _Stop

    with pytest.raises(_Stop):
        generate(observed, params, on_step_end=stop_at_one)


# -- parameters the model cannot honour -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "changes", "param"),
    [
        ("flux", {"width": 60}, "width"),
        ("flux", {"height": 512}, "height"),
        ("flux", {"num_frames": 5}, "num_frames"),
        ("flux", {"n": 0}, "n"),
        ("flux", {"steps": 1000}, "steps"),
        ("flux", {"prompt": "x" * 5000}, "prompt"),
        ("flux", {"guidance_scale": -1.0}, "guidance_scale"),
        ("wan", {"height": 40}, "height"),
        ("wan", {"num_frames": 6}, "num_frames"),
        ("wan", {"num_frames": None}, "num_frames"),
        ("wan", {"num_frames": 101}, "num_frames"),
    ],
)
def test_parameters_the_model_cannot_honour_are_refused(
    fixture: str, changes: dict[str, object], param: str, request: pytest.FixtureRequest
) -> None:
    model: ResidentModel = request.getfixturevalue(fixture)
    params = params_for(model, **changes)
    with pytest.raises(InvalidGenerationParams) as raised:
        check_params(model, params)
    assert raised.value.param == param
