"""Two replicas of one model in one process: requests spread over them, the bytes stay the same."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import LiveServer, b64_items, live_server, wait_until

BODY = {"model": "tiny-flux", "prompt": "a red cat", "seed": 5, "steps": 3, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"], replicas=2, torch_threads=1)


@pytest.fixture(scope="module")
def single(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"], torch_threads=1)


def _hold(server: LiveServer, replica: int) -> tuple[threading.Event, threading.Event, Any]:
    """Replica ``replica``'s transformer waits for ``release`` at its first call; ``held`` says it got there."""
    generations = server.runtime.generations
    assert generations is not None
    transformer = generations.replicas["tiny-flux"][replica].model.pipeline.transformer
    held, release = threading.Event(), threading.Event()

    def wait(module: Any, args: Any) -> None:
        held.set()
        assert release.wait(60), "never released"

    return held, release, transformer.register_forward_pre_hook(wait)


def test_the_model_card_lists_both_replicas(server: LiveServer) -> None:
    with server.client() as client:
        card = client.get("/v1/models/tiny-flux").json()
    assert [(replica["id"], replica["device"]) for replica in card["replicas"]] == [
        ("0", "cpu"),
        ("1", "cpu"),
    ]


def test_a_busy_replica_passes_the_next_request_to_the_other(server: LiveServer, single: LiveServer) -> None:
    held, release, handle = _hold(server, replica=0)
    try:
        with server.client() as client, ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.post, "/v1/generations", json=BODY)
            assert held.wait(60)
            # Replica 0 is stuck inside its first step: only replica 1 can answer this one.
            second = client.post("/v1/generations", json=BODY)
            assert second.status_code == 200
            assert not first.done()
            card = client.get("/v1/models/tiny-flux").json()
            assert [replica["running"] for replica in card["replicas"]] == [1, 0]
            release.set()
            assert first.result(timeout=60).status_code == 200
    finally:
        release.set()
        handle.remove()
    # Either replica, and a server with one: the same bytes for the same body and seed.
    with single.client() as client:
        reference = b64_items(client.post("/v1/generations", json=BODY).json())
    assert b64_items(first.result().json()) == b64_items(second.json()) == reference


def test_gauges_are_labelled_per_replica(server: LiveServer) -> None:
    with server.client() as client:
        text = client.get("/metrics").text
    for replica in ("0", "1"):
        assert f'ditcache_queue_depth{{model="tiny-flux",replica="{replica}"}}' in text


def test_a_job_on_the_second_replica_is_followed_and_cancelled(server: LiveServer) -> None:
    held0, release0, handle0 = _hold(server, replica=0)
    held1, release1, handle1 = _hold(server, replica=1)
    try:
        with server.client() as client, ThreadPoolExecutor(1) as pool:
            pool.submit(client.post, "/v1/generations", json=BODY)
            assert held0.wait(60)
            job = client.post("/v1/jobs", json={**BODY, "steps": 20}).json()
            assert held1.wait(60)
            wait_until(
                lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="running"
            )
            assert client.delete(f"/v1/jobs/{job['id']}").status_code == 202
            release1.set()
            wait_until(
                lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled", what="cancelled"
            )
            release0.set()
    finally:
        release0.set()
        release1.set()
        handle0.remove()
        handle1.remove()


def test_a_client_spread_over_both_replicas_gets_every_answer(server: LiveServer) -> None:
    bodies = [{**BODY, "seed": seed} for seed in range(6)]
    with server.client() as client, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda body: client.post("/v1/generations", json=body), bodies))
    assert [answer.status_code for answer in answers] == [200] * 6
    assert len({b64_items(answer.json())[0] for answer in answers}) == 6
