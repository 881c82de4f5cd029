"""LoRA adapters per request: resident from ``--lora``, named per request, applied in the request's own
forward, never on the shared weights. A request's output is what diffusers gives with the same adapters
and weights set by ``load_lora_weights`` and ``set_adapters`` on a private copy; without adapters, the
base model's."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tiny_pipelines import tiny_pipeline

from .conftest import (
    LiveServer,
    b64_items,
    direct_pipeline,
    error_of,
    live_server,
    one_thread_server,
    pixels_of,
    sent_together,
)

PROMPT = "a red circle on a blue background"
BODY: dict[str, Any] = {"model": "flux", "prompt": PROMPT, "steps": 3, "seed": 9, "width": 32, "height": 32}
# Which linear modules each adapter changes, and its rank.
ADAPTERS = {
    "outline": (("attn.to_q", "attn.to_v"), 4),
    "warm": (("attn.to_k", "attn.to_out.0", "ff.net.2"), 8),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("loras") / "flux"
    tiny_pipeline("flux").build().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_folders(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each adapter as diffusers writes one (save_lora_weights), with seeded random pairs."""
    from diffusers import FluxPipeline

    transformer = tiny_pipeline("flux").build().transformer
    written = {}
    for index, (name, (suffixes, rank)) in enumerate(ADAPTERS.items()):
        generator = torch.Generator().manual_seed(100 + index)
        state = {}
        for path, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(suffixes):
                state[f"{path}.lora_A.weight"] = (
                    torch.randn(rank, module.in_features, generator=generator) * 0.2
                )
                state[f"{path}.lora_B.weight"] = (
                    torch.randn(module.out_features, rank, generator=generator) * 0.2
                )
        target = tmp_path_factory.mktemp(f"lora-{name}")
        FluxPipeline.save_lora_weights(target, transformer_lora_layers=state)
        written[name] = target
    return written


@pytest.fixture(scope="module")
def server(model_cache: Path, folder: Path, lora_folders: dict[str, Path]) -> Iterator[LiveServer]:
    loras = [f"flux:{name}={path}" for name, path in lora_folders.items()]
    yield from one_thread_server(model_cache, models=[str(folder)], loras=loras)


def _generate(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/generations", json={**BODY, **fields})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _direct(folder: Path, lora_folders: dict[str, Path], chosen: list[tuple[str, float]]) -> np.ndarray:
    """A private copy of the pipeline with diffusers' own adapters, set as its documentation shows."""

    pipeline = direct_pipeline("FluxPipeline", folder)
    for name, _ in chosen:
        pipeline.load_lora_weights(lora_folders[name], adapter_name=name)
    if chosen:
        pipeline.set_adapters([name for name, _ in chosen], adapter_weights=[weight for _, weight in chosen])
    assert torch.get_num_threads() == 1
    image = pipeline(
        prompt=PROMPT,
        width=32,
        height=32,
        num_inference_steps=3,
        true_cfg_scale=1.0,
        num_images_per_prompt=1,
        generator=torch.Generator("cpu").manual_seed(9),
        output_type="pil",
    ).images[0]
    return np.asarray(image.convert("RGB"))


def test_the_card_lists_the_adapters(client: httpx.Client) -> None:
    card = client.get("/v1/models/flux").json()
    shown = {adapter["name"]: adapter for adapter in card["adapters"]}
    assert set(shown) == set(ADAPTERS)
    assert (shown["outline"]["rank"], shown["warm"]["rank"]) == (4, 8)
    assert all(adapter["modules"] > 0 and adapter["bytes"] > 0 for adapter in shown.values())


@pytest.mark.parametrize(
    "chosen",
    [[], [("outline", 1.0)], [("warm", 0.7)], [("outline", 0.8), ("warm", -0.5)]],
    ids=["none", "one", "another", "two"],
)
def test_a_requests_adapters_give_diffusers_output(
    client: httpx.Client, folder: Path, lora_folders: dict[str, Path], chosen: list[tuple[str, float]]
) -> None:
    answer = _generate(client, loras=[{"name": name, "scale": weight} for name, weight in chosen])
    assert answer["loras"] == [{"name": name, "scale": weight} for name, weight in chosen]
    assert np.array_equal(pixels_of(answer), _direct(folder, lora_folders, chosen))


def test_the_hooks_are_there_only_while_a_request_with_adapters_runs(
    server: LiveServer, client: httpx.Client
) -> None:
    _generate(client, loras=[{"name": "outline"}])
    generations = server.runtime.generations
    assert generations is not None
    transformer = generations.models["flux"].pipeline.transformer
    linears = [module for module in transformer.modules() if isinstance(module, torch.nn.Linear)]
    assert not any(module._forward_hooks or "forward" in vars(module) for module in linears)


@pytest.mark.parametrize("fold_mb", [0.0, 0.05], ids=["never folded", "partly folded"])
def test_adapters_added_rather_than_folded_give_diffusers_output(
    model_cache: Path, folder: Path, lora_folders: dict[str, Path], fold_mb: float
) -> None:
    """A request folds its adapters into weights of its own while they fit ``lora_fold_mb`` (the
    module-wide server folds them all: a tiny Flux projection is 16 KiB); past it, each module adds the
    low-rank update to the shared weight's product instead. Either way, or both in one request, the output
    is diffusers'; the shared weights never change."""
    chosen = [("outline", 0.8), ("warm", -0.5)]
    loras = [f"flux:{name}={path}" for name, path in lora_folders.items()]
    for served in one_thread_server(model_cache, models=[str(folder)], loras=loras, lora_fold_mb=fold_mb):
        generations = served.runtime.generations
        assert generations is not None
        transformer = generations.models["flux"].pipeline.transformer
        before = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
        with served.client() as client:
            answer = _generate(client, loras=[{"name": name, "scale": weight} for name, weight in chosen])
        after = transformer.state_dict()
        assert all(torch.equal(before[name], after[name]) for name in before)
    assert np.array_equal(pixels_of(answer), _direct(folder, lora_folders, chosen))


def test_adapters_change_the_output_and_every_cache_policy_still_acts(client: httpx.Client) -> None:
    base, adapted = _generate(client), _generate(client, loras=[{"name": "outline"}])
    assert not np.array_equal(pixels_of(base), pixels_of(adapted))
    for method, policy in client.get("/v1/models/flux").json()["method_defaults"].items():
        answer = _generate(client, loras=[{"name": "warm"}], cache=policy)
        assert answer["cache"]["method"] == method and answer["loras"] == [{"name": "warm", "scale": 1.0}]


def test_concurrent_requests_with_different_adapters_never_mix(client: httpx.Client) -> None:
    choices = [
        [],
        [{"name": "outline"}],
        [{"name": "warm"}],
        [{"name": "outline"}, {"name": "warm", "scale": 0.5}],
    ]
    alone = [pixels_of(_generate(client, loras=loras)) for loras in choices]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(lambda i: (i % 4, pixels_of(_generate(client, loras=choices[i % 4]))), range(8))
        )
    assert all(np.array_equal(pixels, alone[which]) for which, pixels in together)


def test_requests_with_different_adapters_share_merged_forwards(
    model_cache: Path, folder: Path, lora_folders: dict[str, Path]
) -> None:
    """On a server merging forwards, requests with different adapters, or none, run in one forward,
    each request's adapters on its own rows: each gets its diffusers output."""
    choices: list[list[tuple[str, float]]] = [
        [],
        [("outline", 1.0)],
        [("warm", 0.7)],
        [("outline", 0.8), ("warm", -0.5)],
    ]
    loras = [f"flux:{name}={path}" for name, path in lora_folders.items()]
    for merging in one_thread_server(
        model_cache, models=[str(folder)], loras=loras, max_batch=len(choices), batch_wait_ms=10_000
    ):
        bodies = [
            {**BODY, "loras": [{"name": name, "scale": weight} for name, weight in chosen]}
            for chosen in choices
        ]
        responses = sent_together(merging, bodies, "flux")
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    answers = [response.json() for response in responses]
    for answer, chosen in zip(answers, choices, strict=True):
        # Every choice differs, so a forward shared with any other request is shared across adapters.
        assert answer["batch"]["largest"] > 1 and answer["batch"]["merged"] > 0
        difference = np.abs(
            pixels_of(answer).astype(np.int16) - _direct(folder, lora_folders, chosen).astype(np.int16)
        )
        assert difference.max() <= 2 and difference.mean() < 0.05


@pytest.mark.parametrize(
    ("loras", "param"),
    [
        ([{"name": "nope"}], "loras.0.name"),
        ([{"name": "outline"}, {"name": "missing"}], "loras.1.name"),
        ([{"name": "outline", "scale": 9}], "loras.0.scale"),
        ([{"name": "outline"}] * 5, "loras"),
        ([{"name": "outline", "weight": 1}], "loras.0.weight"),
    ],
)
def test_a_bad_choice_is_a_422_naming_the_field(client: httpx.Client, loras: list[Any], param: str) -> None:
    response = client.post("/v1/generations", json={**BODY, "loras": loras})
    assert response.status_code == 422 and error_of(response)["param"] == param, response.text


def test_an_adapter_spec_is_checked_at_start(model_cache: Path, folder: Path) -> None:
    from pydantic import ValidationError

    from server.settings import Settings

    with pytest.raises(ValidationError, match="MODEL:NAME=SOURCE"):
        Settings(cache_dir=model_cache, models=[str(folder)], loras=["flux=somewhere"])


# -- more families ---------------------------------------------------------------------------------------------

# Per family: the pipeline class, its small request, and how its direct call passes guidance.
FAMILIES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "wan": (
        "WanPipeline",
        {
            "width": 32,
            "height": 32,
            "num_frames": 5,
            "steps": 2,
            "fps": 16,
            "output_format": "webp",
            "guidance_scale": 3.0,
        },
        {"guidance_scale": 3.0, "num_frames": 5},
    ),
    "sd3": (
        "StableDiffusion3Pipeline",
        {"width": 32, "height": 32, "steps": 2, "guidance_scale": 3.0},
        {"guidance_scale": 3.0},
    ),
}


def _family_adapters(name: str, root: Path) -> dict[str, Path]:
    import diffusers

    pipeline_class: Any = getattr(diffusers, FAMILIES[name][0])
    transformer = tiny_pipeline(name).build().transformer
    written = {}
    for index, suffixes in enumerate((("to_q", "to_v"), ("to_k", "to_out.0"))):
        generator = torch.Generator().manual_seed(200 + index)
        state = {}
        for path, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(suffixes):
                state[f"{path}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.2
                state[f"{path}.lora_B.weight"] = (
                    torch.randn(module.out_features, 4, generator=generator) * 0.2
                )
        target = root / f"{name}-lora-{index}"
        pipeline_class.save_lora_weights(target, transformer_lora_layers=state)
        written[f"l{index}"] = target
    return written


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapters_give_diffusers_output_on_other_families(
    model_cache: Path, tmp_path: Path, server: LiveServer, family: str
) -> None:

    from server.models import media

    class_name, request, guidance = FAMILIES[family]
    folder = tmp_path / family
    tiny_pipeline(family).build().save_pretrained(folder)
    adapters = _family_adapters(family, tmp_path)
    chosen = [("l0", 0.9), ("l1", -0.6)]
    body = {"model": family, "prompt": PROMPT, "seed": 9, **request}
    answers = {}
    # After ``server``: its one torch thread is the process's setting, for the direct calls too.
    specs = [f"{family}:{name}={path}" for name, path in adapters.items()]
    for served in live_server(model_cache, models=[str(folder)], loras=specs, torch_threads=1):
        with served.client() as client:
            for count in (1, 2):
                loras = [{"name": name, "scale": weight} for name, weight in chosen[:count]]
                response = client.post("/v1/generations", json={**body, "loras": loras})
                assert response.status_code == 200, response.text
                answers[count] = b64_items(response.json())
    for count in (1, 2):
        pipeline = direct_pipeline(class_name, folder)
        for name, _ in chosen[:count]:
            pipeline.load_lora_weights(adapters[name], adapter_name=name)
        pipeline.set_adapters(
            [name for name, _ in chosen[:count]], adapter_weights=[w for _, w in chosen[:count]]
        )
        output = pipeline(
            prompt=PROMPT,
            width=request["width"],
            height=request["height"],
            num_inference_steps=request["steps"],
            generator=torch.Generator("cpu").manual_seed(9),
            output_type="pil",
            **guidance,
        )
        if family == "wan":
            expected = [media.encode_video(output.frames[0], "webp", request["fps"])]
        else:
            expected = [media.encode_image(output.images[0], "png")]
        assert answers[count] == expected, (family, count)


def test_an_adapter_for_no_served_model_or_with_compile_is_refused_at_start(
    model_cache: Path, folder: Path
) -> None:
    from server.runtime.loading import _load_adapters
    from server.settings import Settings

    with pytest.raises(ValueError, match="names no served model"):
        _load_adapters(Settings(cache_dir=model_cache, loras=["nope:style=/x"]), {})
    with pytest.raises(ValueError, match="compile"):
        _load_adapters(Settings(cache_dir=model_cache, loras=["flux:style=/x"], compile=True), {})
