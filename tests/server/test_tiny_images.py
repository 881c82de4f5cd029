"""The tiny image pipelines beyond Flux: real calls, a save/load round trip, prompt and guidance at work."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cache_engine import CacheEngine
from cache_engine.methods import METHOD_NAMES
from tiny_pipelines import DEFAULT_SEED, tiny_pipeline

PROMPT = "a small red circle on a blue background"
OTHER_PROMPT = "a big green tree by the river"
NEGATIVE_PROMPT = "dark gray"
TOKENIZER_PROBES = (PROMPT, "Zebra crossing, 3 times!", "", "été à 10h [IMG]<|im_end|>")


@dataclass(frozen=True)
class Guidance:
    """The argument a pipeline really guides with, a value that turns guidance off and one that does not."""

    argument: str
    off: float
    on: float
    # Pipelines that guide against a negative prompt take one; Flux2 Klein guides against "".
    negative_prompt: bool = True


GUIDANCE: Mapping[str, Guidance] = {
    "flux2": Guidance("guidance_scale", 1.0, 4.0, negative_prompt=False),
    "qwenimage": Guidance("true_cfg_scale", 1.0, 4.0),
    "sd3": Guidance("guidance_scale", 1.0, 7.0),
    "cogview4": Guidance("guidance_scale", 1.0, 5.0),
    "pixart_sigma": Guidance("guidance_scale", 1.0, 4.5),
}
NAMES = tuple(GUIDANCE)


@dataclass(frozen=True)
class Pair:
    name: str
    built: Any
    loaded: Any

    def call(self, pipe: Any, prompt: str = PROMPT, guided: bool = True) -> np.ndarray:
        guidance = GUIDANCE[self.name]
        kwargs: dict[str, Any] = {guidance.argument: guidance.on if guided else guidance.off}
        if guidance.negative_prompt:
            kwargs["negative_prompt"] = NEGATIVE_PROMPT
        images = pipe(
            prompt=prompt,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **tiny_pipeline(self.name).small_call,
            **kwargs,
        ).images
        assert isinstance(images, np.ndarray)
        return images


def _realign(pipe: Any) -> None:
    """Moves every weight of a loaded pipeline into memory of its own.

    Loaded weights stay inside the memory-mapped safetensors file, at offsets aligned to 8 bytes only,
    and the CPU matrix kernels round the last bit differently on unaligned data. Copying changes no
    value, so what remains to compare is the model, not where it sits.
    """
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()


@pytest.fixture(scope="module", params=NAMES)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    from diffusers import DiffusionPipeline

    name: str = request.param
    built = tiny_pipeline(name).build(DEFAULT_SEED)
    folder: Path = tmp_path_factory.mktemp(name)
    built.save_pretrained(folder)
    loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    _realign(loaded)
    for pipe in (built, loaded):
        pipe.set_progress_bar_config(disable=True)
    yield Pair(name, built, loaded)


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def test_a_saved_pipeline_loads_as_the_same_class_and_generates_the_same_image(pair: Pair) -> None:
    assert type(pair.loaded) is type(pair.built)
    assert pair.loaded.components.keys() == pair.built.components.keys()
    for component, module in pair.built.components.items():
        assert type(pair.loaded.components[component]) is type(module), component
    assert _public(pair.loaded.config) == _public(pair.built.config)
    for component, tokenizer in pair.built.components.items():
        if component.startswith("tokenizer"):
            reloaded = pair.loaded.components[component]
            for text in TOKENIZER_PROBES:
                assert reloaded(text).input_ids == tokenizer(text).input_ids, (component, text)

    image = pair.call(pair.built)
    size = tiny_pipeline(pair.name).small_call
    assert image.shape == (1, size["height"], size["width"], 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    np.testing.assert_array_equal(pair.call(pair.loaded), image)


def test_the_small_call_gives_at_least_a_4x4_token_grid(pair: Pair) -> None:
    transformer = pair.built.transformer
    grids: list[tuple[int, int]] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.ndim == 3:  # packed tokens (Flux2, Qwen-Image): a square grid here
            side = math.isqrt(hidden.shape[1])
            grids.append((side, hidden.shape[1] // side) if side * side == hidden.shape[1] else (0, 0))
        else:
            patch = module.config.patch_size
            grids.append((hidden.shape[-2] // patch, hidden.shape[-1] // patch))

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pair.call(pair.built, guided=False)
    finally:
        handle.remove()
    assert grids and min(grids[0]) >= 4


def test_the_prompt_changes_the_image(pair: Pair) -> None:
    difference = np.abs(pair.call(pair.built) - pair.call(pair.built, prompt=OTHER_PROMPT)).max()
    assert difference > 1e-4


def test_the_guidance_argument_changes_the_image(pair: Pair) -> None:
    difference = np.abs(pair.call(pair.built) - pair.call(pair.built, guided=False)).max()
    assert difference > 1e-4


def test_every_cache_method_applies(pair: Pair) -> None:
    engine = CacheEngine(pair.built.transformer)
    try:
        assert engine.supported_methods == METHOD_NAMES
        # Block-skipping methods need several blocks to skip.
        assert len(engine.layout.blocks) >= 4
    finally:
        engine.close()


def _weights(pipe: Any) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{key}": tensor
        for component, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, tensor in module.state_dict().items()
    }


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_builds_the_same_weights_and_another_seed_others(name: str) -> None:
    tiny = tiny_pipeline(name)
    first, again, other = (
        _weights(tiny.build(DEFAULT_SEED)),
        _weights(tiny.build(DEFAULT_SEED)),
        _weights(tiny.build(DEFAULT_SEED + 1)),
    )
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(tensor, again[key]) for key, tensor in first.items())
    assert any(
        not torch.equal(tensor, other[key]) for key, tensor in first.items() if tensor.is_floating_point()
    )


def test_qwenimage_drops_exactly_its_template_from_the_prompt() -> None:
    from tiny_pipelines.qwenimage import PROMPT_TEMPLATE

    pipe = tiny_pipeline("qwenimage").build(DEFAULT_SEED)
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    prefix, suffix = PROMPT_TEMPLATE.split("{}")
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx
    # Every template word is one token, and the prompt's words stay whole after the prefix.
    ids = pipe.tokenizer(PROMPT_TEMPLATE.format(PROMPT)).input_ids
    kept = ids[pipe.prompt_template_encode_start_idx :]
    assert len(kept) == len(PROMPT.split()) + len(pipe.tokenizer(suffix).input_ids)
