"""Adapters added and removed while serving, behind the admin key: sources confined to lora_dir, a bound
on how many a model holds, and a removal that waits for the requests running with the adapter."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tiny_pipelines import tiny_pipeline

from .conftest import LiveServer, b64_items, error_of, gated, live_server, pixels_of, wait_until

ADMIN = "admin-secret"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
BODY: dict[str, Any] = {"model": "tiny-flux", "prompt": "a red circle", "steps": 3, "seed": 2}


def _write_adapter(folder: Path, seed: int) -> None:
    from diffusers import FluxPipeline

    transformer = tiny_pipeline("flux").build().transformer
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and path.endswith(("attn.to_q", "attn.to_v")):
            state[f"{path}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
            state[f"{path}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.3
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-dir")
    for index, name in enumerate(("style", "other", "third")):
        _write_adapter(root / name, seed=index)
    outside = tmp_path_factory.mktemp("outside")
    _write_adapter(outside / "escaped", seed=9)
    (root / "link").symlink_to(outside / "escaped", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def server(model_cache: Path, lora_dir: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"], admin_key=ADMIN, lora_dir=lora_dir, max_loras=2)


def _add(client: httpx.Client, name: str, source: str, **headers: str) -> httpx.Response:
    return client.post(
        "/v1/admin/models/tiny-flux/loras", json={"name": name, "source": source}, headers=headers or HEADERS
    )


def test_an_adapter_is_added_used_and_removed_while_serving(client: httpx.Client) -> None:
    base = client.post("/v1/generations", json=BODY).json()
    added = _add(client, "style", "style")
    assert added.status_code == 201, added.text
    assert added.json()["name"] == "style" and added.json()["rank"] == 4
    assert [a["name"] for a in client.get("/v1/models/tiny-flux").json()["adapters"]] == ["style"]
    styled = client.post("/v1/generations", json={**BODY, "loras": [{"name": "style"}]})
    assert styled.status_code == 200 and not np.array_equal(pixels_of(styled.json()), pixels_of(base))
    assert _add(client, "style", "other").status_code == 409
    removed = client.delete("/v1/admin/models/tiny-flux/loras/style", headers=HEADERS)
    assert removed.status_code == 200 and removed.json() == {"removed": "style"}
    assert client.get("/v1/models/tiny-flux").json()["adapters"] == []
    refused = client.post("/v1/generations", json={**BODY, "loras": [{"name": "style"}]})
    assert refused.status_code == 422 and error_of(refused)["param"] == "loras.0.name"
    assert client.delete("/v1/admin/models/tiny-flux/loras/style", headers=HEADERS).status_code == 404
    # The model answers as before it held any.
    assert b64_items(client.post("/v1/generations", json=BODY).json()) == b64_items(base)


@pytest.mark.parametrize("source", ["../outside/escaped", "/etc", "link", "missing", "style/../../x", ""])
def test_a_source_outside_lora_dir_is_refused(client: httpx.Client, source: str) -> None:
    response = _add(client, "escape", source)
    assert response.status_code == 422, response.text
    assert error_of(response)["param"] in ("source", "body.source"), response.text


def test_the_admin_routes_need_the_admin_key(client: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = client.post(
            "/v1/admin/models/tiny-flux/loras", json={"name": "x", "source": "style"}, headers=headers
        )
        assert response.status_code == 401, response.text


def test_a_model_holds_at_most_max_loras(client: httpx.Client) -> None:
    try:
        assert _add(client, "first", "style").status_code == 201
        assert _add(client, "second", "other").status_code == 201
        third = _add(client, "third", "third")
        assert third.status_code == 409 and "max_loras" in error_of(third)["message"]
    finally:
        for name in ("first", "second"):
            client.delete(f"/v1/admin/models/tiny-flux/loras/{name}", headers=HEADERS)


def test_a_removal_waits_for_the_requests_running_with_the_adapter(
    server: LiveServer, client: httpx.Client
) -> None:
    assert _add(client, "style", "style").status_code == 201
    body = {**BODY, "loras": [{"name": "style"}]}
    expected = client.post("/v1/generations", json=body).json()
    answers: list[httpx.Response] = []
    removals: list[httpx.Response] = []
    with gated(server) as gate:
        gate.hold("held", after=1)
        running = threading.Thread(
            target=lambda: answers.append(
                client.post("/v1/generations", json=body, headers={"X-Request-Id": "held"})
            )
        )
        running.start()
        wait_until(lambda: gate.waiting("held"), 60, "the request held at its second step")
        removal = threading.Thread(
            target=lambda: removals.append(
                client.delete("/v1/admin/models/tiny-flux/loras/style", headers=HEADERS)
            )
        )
        removal.start()
        # Gone for new requests at once ...
        wait_until(
            lambda: client.get("/v1/models/tiny-flux").json()["adapters"] == [], 30, "the adapter unlisted"
        )
        # ... while the removal waits for the request running with it.
        assert not removals
        gate.allow("held")
        running.join(60)
        removal.join(60)
    assert removals[0].status_code == 200
    assert answers[0].status_code == 200 and b64_items(answers[0].json()) == b64_items(expected)


def test_without_an_admin_key_there_are_no_admin_routes(model_cache: Path) -> None:
    for plain in live_server(model_cache, models=["tiny-flux"]):
        with plain.client() as client:
            response = client.post("/v1/admin/models/tiny-flux/loras", json={"name": "x", "source": "y"})
    assert response.status_code == 404
