"""The adapter that ships beside shapes-flux: resident by default, chosen per request like any other, and
what diffusers' own ``load_lora_weights`` makes of the same file; left out when the operator says so, or
when compiling (which serves no adapters)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from server.models.builtin import SHAPES_FLUX_FOLDER, SHAPES_FLUX_OUTLINE_FOLDER
from server.runtime.loading import shipped_adapters
from server.settings import Settings

from .conftest import LiveServer, direct_pipeline, live_server, one_thread_server, pixels_of

PROMPT = "a large red circle on a blue background"
STEPS = 6


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from one_thread_server(model_cache, models=["shapes-flux"])


def test_the_default_server_holds_the_outline_adapter(client: httpx.Client) -> None:
    (shown,) = client.get("/v1/models/shapes-flux").json()["adapters"]
    assert shown["name"] == "outline" and shown["rank"] == 16 and shown["modules"] > 0


def test_a_request_with_it_gives_what_diffusers_loads_from_the_same_file(client: httpx.Client) -> None:
    body = {
        "model": "shapes-flux",
        "prompt": PROMPT,
        "steps": STEPS,
        "seed": 3,
        "loras": [{"name": "outline"}],
    }
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["loras"] == [{"name": "outline", "scale": 1.0}]

    pipeline = direct_pipeline("FluxPipeline", SHAPES_FLUX_FOLDER)
    pipeline.load_lora_weights(SHAPES_FLUX_OUTLINE_FOLDER, adapter_name="outline")
    assert torch.get_num_threads() == 1
    direct = pipeline(
        prompt=PROMPT,
        width=64,
        height=64,
        num_inference_steps=STEPS,
        true_cfg_scale=3.0,
        negative_prompt="",
        max_sequence_length=16,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.array_equal(pixels_of(response.json()), np.asarray(direct.convert("RGB")))


def test_no_builtin_loras_leaves_it_out(model_cache: Path) -> None:
    for bare in live_server(model_cache, models=["shapes-flux"], builtin_loras=False):
        with bare.client() as client:
            assert client.get("/v1/models/shapes-flux").json()["adapters"] == []


def test_compiling_leaves_it_out_rather_than_refusing_to_start() -> None:
    served = {"shapes-flux": "builtin:shapes-flux", "shapes-flux-copy": "local:server/assets/shapes-flux"}
    assert shipped_adapters(Settings(compile=False), served) == [
        ("shapes-flux", "outline", str(SHAPES_FLUX_OUTLINE_FOLDER))
    ]
    assert shipped_adapters(Settings(compile=True), served) == []


def test_an_operators_adapter_of_the_same_name_takes_its_place(model_cache: Path, tmp_path: Path) -> None:
    own = tmp_path / "my-outline"
    shutil.copytree(SHAPES_FLUX_OUTLINE_FOLDER, own)
    for served in live_server(model_cache, models=["shapes-flux"], loras=[f"shapes-flux:outline={own}"]):
        generations = served.runtime.generations
        assert generations is not None
        adapters = generations.models["shapes-flux"].adapters
        assert adapters is not None
        assert [(adapter.name, adapter.source) for adapter in adapters] == [("outline", str(own))]
