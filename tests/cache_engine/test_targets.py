"""The model table against live modules: blocks, attention, output layout and the timestep scale."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models import DiTTransformer2DModel

import cache_engine as ce
from cache_engine.targets import FAMILIES as FAMILY_TABLE
from cache_engine.targets import GENERIC_FAMILY, build_layout
from tests.cache_engine.pipelines import FAMILIES, FAMILY_INFO, build, run
from tests.cache_engine.support import seeded_model

FAMILY_BY_NAME = {spec.name: spec for spec in FAMILY_TABLE}


def _count(transformer: torch.nn.Module, list_name: str) -> int:
    blocks = transformer.get_submodule(list_name)
    assert isinstance(blocks, torch.nn.ModuleList)
    return len(blocks)


def _expand(family: str, patterns: tuple[str, ...]) -> list[str]:
    transformer = build(family).pipe.transformer
    names: list[str] = []
    for list_name in FAMILY_INFO[family].block_lists:
        for index in range(_count(transformer, list_name)):
            names.extend(p.format(i=index) for p in patterns if p.startswith(f"{list_name}."))
    return names


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_matches_the_family_table(family: str) -> None:
    info = FAMILY_INFO[family]
    transformer = build(family).pipe.transformer
    layout = build_layout(transformer)

    assert layout.family.name == family
    assert layout.denoiser is transformer
    assert layout.family.output_format == info.output_layout

    expected_blocks = [
        f"{list_name}.{i}" for list_name in info.block_lists for i in range(_count(transformer, list_name))
    ]
    assert [site.name for site in layout.blocks] == expected_blocks
    assert all(site.module is transformer.get_submodule(site.name) for site in layout.blocks)

    hidden = info.block_outputs.index("hidden_states")
    encoder = (
        info.block_outputs.index("encoder_hidden_states")
        if "encoder_hidden_states" in info.block_outputs
        else None
    )
    assert {(site.hidden_states_index, site.encoder_hidden_states_index) for site in layout.blocks} == {
        (hidden, encoder)
    }

    in_blocks = {site.name for site in layout.attention if site.name.split(".")[0] in info.block_lists}
    assert in_blocks == set(_expand(family, info.attention_modules))


def test_attention_outside_the_blocks_is_still_attention() -> None:
    """HunyuanVideo's text refiner has attention of its own; methods that match by name may use it."""
    layout = build_layout(build("hunyuan_video").pipe.transformer)
    outside = {site.name for site in layout.attention} - set(
        _expand("hunyuan_video", FAMILY_INFO["hunyuan_video"].attention_modules)
    )
    assert outside and all(name.startswith("context_embedder.token_refiner.") for name in outside)


def test_attention_kinds() -> None:
    wan = build_layout(build("wan").pipe.transformer)
    assert {site.name.rsplit(".", 1)[1]: site.kind for site in wan.attention} == {
        "attn1": "spatial",
        "attn2": "cross",
    }
    flux = build_layout(build("flux").pipe.transformer)
    assert {site.kind for site in flux.attention} == {"spatial"}


@pytest.mark.parametrize("family", FAMILIES)
def test_timestep_read_from_the_call_is_on_the_schedulers_scale(family: str) -> None:
    """What PAB and FasterCache compare their windows with: the scheduler's own timesteps, 0..1000."""
    tp = build(family)
    tp.call_kwargs["num_inference_steps"] = 4
    transformer = tp.pipe.transformer
    engine = ce.CacheEngine(transformer)
    seen: list[float | None] = []
    sessions: list[ce.CacheSession] = []
    hook = transformer.register_forward_hook(lambda *_: seen.append(sessions[0].current_timestep))
    try:
        with engine.session(None) as session:
            sessions.append(session)
            run(tp)
    finally:
        hook.remove()
        engine.close()
    calls_per_step = 2 if tp.cfg == "separate" else 1
    expected = [float(t) for t in tp.pipe.scheduler.timesteps for _ in range(calls_per_step)]
    assert seen == pytest.approx(expected, rel=1e-5, abs=1e-3)


def test_timestep_argument_by_keyword_or_position() -> None:
    layout = build_layout(build("pixart").pipe.transformer)
    hidden, text, t = torch.zeros(1), torch.zeros(1), torch.tensor([321.0])
    assert layout.timestep_from_call((hidden,), {"encoder_hidden_states": text, "timestep": t}) is t
    assert layout.timestep_from_call((hidden, text, t), {}) is t
    assert layout.timestep_from_call((hidden, text), {}) is None
    assert layout.to_denoising_timestep(t) == 321.0
    assert layout.to_denoising_timestep(None) is None
    assert layout.to_denoising_timestep(torch.tensor([])) is None


def test_flux_timestep_is_rescaled() -> None:
    layout = build_layout(build("flux").pipe.transformer)
    assert layout.to_denoising_timestep(torch.tensor([0.25, 0.25])) == 250.0
    assert layout.to_denoising_timestep(0.5) == 500.0


def test_a_timestep_per_token_is_the_noisiest_tokens() -> None:
    """Wan 2.2 TI2V passes one timestep per token, the image's first latent frame held at 0 (clean): the
    step's timestep is that of the tokens it denoises, whichever way the family's time runs."""
    per_token = torch.tensor([[0.0] * 4 + [900.0] * 4])
    wan = build_layout(build("wan").pipe.transformer)
    assert wan.to_denoising_timestep(per_token) == 900.0
    assert wan.to_denoising_timestep(per_token.expand(2, -1)) == 900.0
    # One per row stays the first row's.
    assert wan.to_denoising_timestep(torch.tensor([900.0, 900.0])) == 900.0
    # Time rising from 0 at pure noise to 1 (Lumina 2's): the clean tokens sit at 1.
    lumina = dataclasses.replace(wan, family=FAMILY_BY_NAME["lumina2"])
    assert lumina.to_denoising_timestep(torch.tensor([[1.0] * 4 + [0.3] * 4])) == pytest.approx(700.0)


def test_unknown_family_falls_back_to_the_reference_name_patterns() -> None:
    transformer = seeded_model(
        DiTTransformer2DModel,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    layout = build_layout(transformer)
    assert layout.family is GENERIC_FAMILY
    assert [site.name for site in layout.blocks] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert {site.name for site in layout.attention} == {
        "transformer_blocks.0.attn1",
        "transformer_blocks.1.attn1",
    }
    engine = ce.CacheEngine(transformer)
    try:
        assert set(engine.supported_methods) == set(ce.METHOD_NAMES)
    finally:
        engine.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_is_supported_on_every_family(family: str) -> None:
    transformer = build(family).pipe.transformer
    engine = ce.CacheEngine(transformer)
    try:
        assert engine.supported_methods == ce.METHOD_NAMES
    finally:
        engine.close()
