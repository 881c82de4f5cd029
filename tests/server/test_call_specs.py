"""Call specs: each one agrees with its pipeline class, unservable pipelines are refused, README says the same."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

from server.models.call_specs import _SPECS, KNOWN_PIPELINES, CallSpec, UnservablePipeline, call_spec
from tiny_pipelines import tiny_pipeline

README = Path(__file__).resolve().parents[2] / "README.md"


def _pipeline_class(name: str) -> type:
    diffusers = importlib.import_module("diffusers")
    cls: type = getattr(diffusers, name)
    return cls


@pytest.mark.parametrize("name", KNOWN_PIPELINES)
def test_every_argument_a_spec_passes_is_taken_by_its_pipeline(name: str) -> None:
    spec = _SPECS[name]
    accepted = inspect.signature(_pipeline_class(name).__call__).parameters
    assert [arg for arg in spec.passed_arguments() if arg not in accepted] == []
    # The observer matches what the pipeline offers: a callback is used wherever there is one.
    assert (spec.steps_observed_by == "callback") == ("callback_on_step_end" in accepted)


def test_an_image_to_image_pipeline_is_refused_with_its_class_named() -> None:
    from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline

    components = tiny_pipeline("flux").build().components
    with pytest.raises(UnservablePipeline, match="FluxImg2ImgPipeline takes image"):
        call_spec(FluxImg2ImgPipeline(**components))


def test_an_unknown_text_to_image_pipeline_gets_a_spec_from_its_signature() -> None:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    subclass = type("HouseFluxPipeline", (FluxPipeline,), {})
    spec = call_spec(subclass(**tiny_pipeline("flux").build().components))
    assert not spec.known
    assert (spec.kind, spec.guidance_argument, spec.negative_prompt) == ("image", "true_cfg_scale", True)
    assert spec.steps_observed_by == "callback"


def test_flux_without_guidance_embedding_is_called_like_schnell() -> None:
    pipeline = tiny_pipeline("flux").build()
    assert not pipeline.transformer.config.guidance_embeds
    spec = call_spec(pipeline)
    assert dataclasses.replace(spec, default_steps=None, default_guidance=None) != _SPECS["FluxPipeline"]
    assert (spec.guidance_argument, spec.negative_prompt, spec.default_steps) == ("true_cfg_scale", True, 4)


def _readme_rows() -> dict[str, list[str]]:
    """README's family table: pipeline class name -> its cells."""
    text = README.read_text()
    section = text[text.index("## Supported families") :]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines()[1:]:
        # The table of every pipeline class, under its own heading, is generated: not this one.
        if line.startswith("#"):
            break
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for name in re.findall(r"`(\w+Pipeline)`", cells[0]):
            rows.setdefault(name, cells)
    return rows


def test_readme_table_says_what_the_specs_do() -> None:
    rows = _readme_rows()
    assert set(rows) == set(KNOWN_PIPELINES)
    for name, cells in rows.items():
        spec: CallSpec = _SPECS[name]
        _, guidance, negative, fps = cells[:4]
        if spec.guidance_argument is None:
            assert guidance.startswith("422"), name
        else:
            assert guidance.startswith(f"`{spec.guidance_argument}`"), name
        assert (negative == "yes") == spec.negative_prompt, name
        assert (
            (fps.strip("`") == spec.fps_argument)
            if spec.fps_argument
            else fps == "container only" or fps == "-"
        )
