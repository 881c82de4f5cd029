"""The tiny video pipelines (CogVideoX, HunyuanVideo, LTX-Video, Wan 2.2): real calls, a save/load round
trip, conditioning that acts, and sizes that are the smallest the pipeline accepts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cache_engine import CacheEngine
from cache_engine.methods import METHOD_NAMES
from tiny_pipelines import TinyPipeline, tiny_pipeline


@dataclass(frozen=True)
class Case:
    name: str
    pipeline_class: str
    # Wan 2.2 needs 4 steps for its low-noise expert to get one.
    steps: int = 2
    guidance: Mapping[str, Any] = field(default_factory=dict)
    other_guidance: Mapping[str, Any] = field(default_factory=dict)


CASES = {
    case.name: case
    for case in (
        Case(
            "cogvideox",
            "CogVideoXPipeline",
            guidance={"guidance_scale": 6.0},
            other_guidance={"guidance_scale": 2.0},
        ),
        # Embedded guidance: the transformer takes the scale as an input, there is no second pass.
        Case(
            "hunyuan_video",
            "HunyuanVideoPipeline",
            guidance={"guidance_scale": 6.0},
            other_guidance={"guidance_scale": 2.0},
        ),
        Case("ltx", "LTXPipeline", guidance={"guidance_scale": 3.0}, other_guidance={"guidance_scale": 6.0}),
        Case(
            "wan22",
            "WanPipeline",
            steps=4,
            guidance={"guidance_scale": 4.0},
            other_guidance={"guidance_scale": 2.0},
        ),
    )
}


@dataclass
class Built:
    case: Case
    tiny: TinyPipeline
    pipe: Any
    _reference: np.ndarray | None = None

    def generate(self, pipe: Any = None, **overrides: Any) -> np.ndarray:
        arguments: dict[str, Any] = {
            "prompt": "a red cat walking in the snow",
            "negative_prompt": "dark",
            "num_inference_steps": self.case.steps,
            "generator": torch.Generator().manual_seed(0),
            "output_type": "np",
            **self.tiny.small_call,
            **self.case.guidance,
            **overrides,
        }
        frames: np.ndarray = (pipe or self.pipe)(**arguments).frames
        return frames

    @property
    def reference(self) -> np.ndarray:
        """The frames of the default call, made once."""
        if self._reference is None:
            self._reference = self.generate()
        return self._reference


class Pipelines:
    """Each pipeline built once for the module, whichever tests ask for it."""

    def __init__(self) -> None:
        self._built: dict[str, Built] = {}

    def __getitem__(self, name: str) -> Built:
        if name not in self._built:
            case = CASES[name]
            tiny = tiny_pipeline(name)
            pipe = tiny.build()
            pipe.set_progress_bar_config(disable=True)
            self._built[name] = Built(case, tiny, pipe)
        return self._built[name]


@pytest.fixture(scope="module")
def pipelines() -> Pipelines:
    return Pipelines()


@pytest.fixture(scope="module", params=list(CASES))
def built(request: pytest.FixtureRequest, pipelines: Pipelines) -> Built:
    return pipelines[request.param]


def public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _assert_differs(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    # Frames in [0, 1]: a thousand times float32 rounding. (Wan's conditioning is the weakest: its prompt
    # is a handful of tokens among 226 zero-padded ones.)
    assert np.abs(a - b).max() > 1e-4


def test_the_pipeline_is_the_real_class_and_gives_frames_of_the_asked_size(built: Built) -> None:
    assert type(built.pipe).__name__ == built.case.pipeline_class
    call = built.tiny.small_call
    reference = built.reference
    assert reference.shape == (1, call["num_frames"], call["height"], call["width"], 3)
    assert np.isfinite(reference).all()
    assert reference.min() >= 0.0 and reference.max() <= 1.0


def test_save_and_load_give_the_same_pipeline_and_the_same_frames(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built.pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(built.pipe)
    assert loaded.components.keys() == built.pipe.components.keys()
    for name, component in built.pipe.components.items():
        assert type(loaded.components[name]) is type(component), name
    # The saved configuration, less its bookkeeping (_name_or_path, _class_name, _diffusers_version).
    assert public(loaded.config) == public(built.pipe.config)
    np.testing.assert_array_equal(built.generate(loaded), built.reference)


def test_the_same_seed_builds_the_same_weights_and_another_seed_others(built: Built) -> None:
    def weights(pipe: Any) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": tensor
            for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)
            for key, tensor in module.state_dict().items()
        }

    ours, again = weights(built.pipe), weights(built.tiny.build())
    assert ours.keys() == again.keys()
    assert all(torch.equal(tensor, again[key]) for key, tensor in ours.items())
    other = built.tiny.build(seed=1).transformer.state_dict()
    assert any(
        not torch.equal(tensor, other[key]) for key, tensor in built.pipe.transformer.state_dict().items()
    )


def test_the_prompt_changes_the_frames(built: Built) -> None:
    _assert_differs(built.generate(prompt="a blue boat on the sea at night"), built.reference)


def test_guidance_changes_the_frames(built: Built) -> None:
    _assert_differs(built.generate(**built.case.other_guidance), built.reference)


def test_the_small_call_makes_a_4x4_token_grid_over_at_least_2_latent_frames(built: Built) -> None:
    seen: list[tuple[int, int, int]] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        config = module.config
        if built.case.name == "ltx":
            # Packed tokens: the grid comes as arguments. LTX's patches are 1x1x1.
            assert (config.patch_size, config.patch_size_t) == (1, 1)
            seen.append((kwargs["num_frames"], kwargs["height"], kwargs["width"]))
            return
        shape = kwargs["hidden_states"].shape
        if built.case.name == "cogvideox":
            frames, height, width = shape[1], shape[3], shape[4]
        else:
            frames, height, width = shape[2], shape[3], shape[4]
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[-1]
        seen.append((frames, height // patch, width // patch))

    handle = built.pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        built.generate()
    finally:
        handle.remove()
    frames, grid_height, grid_width = seen[0]
    assert frames >= 2
    assert (grid_height, grid_width) == (4, 4)


def test_every_cache_method_applies_to_each_transformer(built: Built) -> None:
    experts = [built.pipe.transformer, getattr(built.pipe, "transformer_2", None)]
    for transformer in filter(None, experts):
        engine = CacheEngine(transformer)
        try:
            assert engine.supported_methods == METHOD_NAMES
            # Block-skipping methods need several blocks to skip.
            assert len(engine.layout.blocks) >= 4
        finally:
            engine.close()


# -- family specifics ------------------------------------------------------------------------------------


def test_hunyuan_template_crop_ends_exactly_at_the_prompt(pipelines: Pipelines) -> None:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    hunyuan = pipelines["hunyuan_video"]
    tokenizer = hunyuan.pipe.tokenizer
    template = str(DEFAULT_PROMPT_TEMPLATE["template"])
    system_part = tokenizer(template.split("{}")[0]).input_ids
    assert system_part[0] == tokenizer.bos_token_id
    # The pipeline cuts crop_start tokens off the front, or, without it, the template's length less
    # "{}" and <|eot_id|>: both must end where the prompt starts.
    assert len(system_part) == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    assert len(tokenizer(template).input_ids) - 2 == len(system_part)
    prompted = tokenizer(template.format("red cat")).input_ids
    assert tokenizer.convert_ids_to_tokens(prompted[len(system_part) :]) == ["red", "▁cat", "<|eot_id|>"]


def test_hunyuan_negative_prompt_acts_only_under_true_cfg(pipelines: Pipelines) -> None:
    hunyuan = pipelines["hunyuan_video"]
    plain = hunyuan.generate(negative_prompt="dark")
    np.testing.assert_array_equal(hunyuan.generate(negative_prompt="bright green tree"), plain)
    true_cfg = hunyuan.generate(negative_prompt="dark", true_cfg_scale=4.0)
    _assert_differs(true_cfg, plain)
    _assert_differs(hunyuan.generate(negative_prompt="bright green tree", true_cfg_scale=4.0), true_cfg)


def test_ltx_takes_the_frame_rate(pipelines: Pipelines) -> None:
    ltx = pipelines["ltx"]
    # The frame rate scales the temporal RoPE positions, so with 2 latent frames it shows in the output.
    _assert_differs(ltx.generate(frame_rate=8), ltx.reference)


def test_wan22_runs_both_experts_split_at_the_boundary(pipelines: Pipelines) -> None:
    built = pipelines["wan22"]
    pipe = built.pipe
    calls = {"transformer": 0, "transformer_2": 0}

    def counter(name: str) -> Any:
        def count(*_: Any) -> None:
            calls[name] += 1

        return count

    handles = [getattr(pipe, name).register_forward_hook(counter(name)) for name in calls]
    try:
        built.generate()
    finally:
        for handle in handles:
            handle.remove()
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high_noise_steps = int((pipe.scheduler.timesteps >= boundary).sum())
    # Two passes a step under classifier-free guidance.
    assert calls == {
        "transformer": 2 * high_noise_steps,
        "transformer_2": 2 * (built.case.steps - high_noise_steps),
    }
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0
