"""The prompt cache over HTTP: a repeated prompt (the empty negative one, say) skips its text encoders,
to the same bytes as a server that keeps none, and the answer and /metrics say what it did."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import LiveServer, b64_items, live_server, metric

# The tiny Flux runs true CFG above guidance 1: each request encodes its prompt and the empty negative one.
BODY: dict[str, Any] = {"model": "tiny-flux", "steps": 2, "seed": 4, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"])


@pytest.fixture(scope="module")
def keeping_none(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"], text_cache_mb=0)


def _generate(client: httpx.Client, prompt: str) -> dict[str, Any]:
    response = client.post("/v1/generations", json={**BODY, "prompt": prompt})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_a_repeated_prompt_hits_and_gives_the_bytes_of_a_server_that_keeps_none(
    client: httpx.Client, keeping_none: LiveServer
) -> None:
    before = {
        result: metric(client, "ditcache_prompt_cache_total", model="tiny-flux", result=result)
        for result in ("hit", "miss")
    }
    first = _generate(client, "a red circle")
    other = _generate(client, "a blue square")
    again = _generate(client, "a red circle")
    # Each request encodes two prompts: its own and the empty negative one, which the first leaves behind.
    assert first["text_cache"] == {"hits": 0, "misses": 2}
    assert other["text_cache"] == {"hits": 1, "misses": 1}
    assert again["text_cache"] == {"hits": 2, "misses": 0}
    after = {
        result: metric(client, "ditcache_prompt_cache_total", model="tiny-flux", result=result)
        for result in ("hit", "miss")
    }
    assert (after["hit"] - before["hit"], after["miss"] - before["miss"]) == (3, 3)
    assert metric(client, "ditcache_prompt_cache_bytes", model="tiny-flux", replica="0") > 0
    with keeping_none.client() as plain:
        for answer, prompt in ((first, "a red circle"), (other, "a blue square"), (again, "a red circle")):
            uncached = plain.post("/v1/generations", json={**BODY, "prompt": prompt}).json()
            assert uncached["text_cache"] is None
            assert b64_items(answer) == b64_items(uncached)
    assert b64_items(again) == b64_items(first)
