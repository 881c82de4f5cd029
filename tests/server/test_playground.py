"""/playground, as a person uses it: headless Chromium runs policies, reads the numbers, copies a command.

The server has an API key, so every test also goes through the page's key handling: the browser gives
the key as HTTP Basic credentials, as a person types it into the browser's prompt, and the page sends
it on to the API as a Bearer token. No request may leave the test server (see ``test_docs_offline``).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shlex
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from server.api.app import create_app
from server.settings import Settings

from .conftest import LiveServer, error_of, live_server
from .test_docs_offline import Browser, browser

KEY = "playground-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEFAULT_MODEL = "shapes-flux"
# The page's own files, besides the API it calls.
PAGE_FILES = {
    "/playground",
    "/playground/playground.js",
    "/playground/playground.css",
    "/docs/assets/favicon.png",
}


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    # The default model first, as `make serve` has it; a video model for the frames.
    yield from live_server(model_cache, models=[DEFAULT_MODEL, "tiny-wan"], api_key=KEY)


@pytest.fixture(scope="module")
def chromium(server: LiveServer) -> Iterator[Browser]:
    credentials = {"username": "me", "password": KEY}
    with browser(server.base_url, http_credentials=credentials) as opened:
        opened.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base_url)
        yield opened


@pytest.fixture
def page(chromium: Browser) -> Iterator[Any]:
    page = chromium.new_page()
    page.goto(chromium.base_url + "/playground")
    page.locator("body[data-ready=true]").wait_for(state="attached")
    yield page
    page.close()
    assert chromium.outside == [], "the page asked for something off the host"


def _card(page: Any, title: str) -> Any:
    return page.locator(
        ".card", has=page.locator(".card-title", has_text=re.compile(f"^{re.escape(title)}$"))
    )


def _term(card: Any, term: str) -> str:
    text: str = card.locator(f'dd[data-term="{term}"]').inner_text()
    return text


def _media_bytes(card: Any) -> bytes:
    source: str = card.locator(".card-media img").get_attribute("src")
    return base64.b64decode(source.split(",", 1)[1])


def _psnr(reference: bytes, other: bytes) -> float:
    a, b = (
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
        for data in (reference, other)
    )
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


# -- the page and its key, over HTTP ------------------------------------------------------------------


def test_the_page_needs_the_key_and_a_browser_can_give_it(server: LiveServer) -> None:
    with server.client() as client:
        missing = client.get("/playground")
        assert missing.status_code == 401 and error_of(missing)["code"] == "unauthorized"
        # Basic, so that a browser asks for it.
        assert missing.headers["www-authenticate"].startswith("Basic ")
        wrong = client.get("/playground", auth=("me", "nope"))
        assert wrong.status_code == 401 and "not valid" in error_of(wrong)["message"]
        assert client.get("/playground/playground.js").status_code == 401
        for credentials in ({"auth": ("anyone", KEY)}, {"headers": AUTH}):
            page = client.get("/playground", **credentials)
            assert page.status_code == 200
            assert f'<meta name="ditcache-api-key" content="{KEY}">' in page.text
            # The answer carries the key: never stored, never framed.
            assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"
            assert "default-src 'self'" in page.headers["content-security-policy"]
        script = client.get("/playground/playground.js", headers=AUTH)
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert client.get("/playground/other.js", headers=AUTH).status_code == 404


def test_without_a_key_the_page_is_open_and_names_none(model_cache: Path) -> None:
    # No lifespan: the page needs no model to be served.
    client = TestClient(create_app(Settings(cache_dir=model_cache)))
    page = client.get("/playground")
    assert page.status_code == 200 and '<meta name="ditcache-api-key" content="">' in page.text


def test_a_setting_turns_the_page_off(model_cache: Path) -> None:
    client = TestClient(create_app(Settings(cache_dir=model_cache, disable_playground=True)))
    for path in ("/playground", "/playground/playground.js"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.get("/docs").status_code == 200


# -- in the browser -----------------------------------------------------------------------------------


def test_two_policies_on_the_default_model_beside_the_uncached_image(
    page: Any, chromium: Browser, server: LiveServer
) -> None:
    assert page.locator("#model").input_value() == DEFAULT_MODEL
    policies = page.locator("#policy-list .policy")
    assert policies.count() == 2
    # One preset and one method with a field of its own.
    policies.nth(1).locator(".policy-kind").select_option(label="first_block_cache")
    policies.nth(1).locator('[data-field="threshold"] input').fill("0.3")
    page.locator("#run").click()
    cards = page.locator(".card")
    assert cards.count() == 3
    page.locator('.card[data-status="succeeded"]').nth(2).wait_for(state="attached", timeout=60_000)
    page.locator('dd[data-term="PSNR"]', has_text="dB").nth(1).wait_for()

    uncached, fast, first_block = (
        _card(page, "uncached"),
        _card(page, "preset fast"),
        _card(page, "first_block_cache"),
    )
    images = [_media_bytes(card) for card in (uncached, fast, first_block)]
    for card, data in zip((uncached, fast, first_block), images, strict=True):
        assert Image.open(io.BytesIO(data)).size == (64, 64)
        assert card.locator(".card-media img").evaluate("img => img.complete && img.naturalWidth") == 64
        assert re.fullmatch(r"[\d.]+ ms, 20 steps", _term(card, "denoising"))
        assert _term(card, "seed") == "42"
    assert _term(uncached, "speedup") == "×1.00 (reference)"
    assert re.fullmatch(r"×[\d.]+", _term(fast, "speedup")) and re.fullmatch(
        r"×[\d.]+", _term(fast, "end to end")
    )
    # The fast preset reuses work on this model: the page says how much.
    computed, cached = map(int, re.findall(r"\d+", _term(fast, "denoiser calls")))
    assert computed > 0 and cached > 0
    assert re.fullmatch(r"\d+% \(\d+ of \d+\)", _term(fast, "blocks reused"))
    # The page's PSNR is the one the images give.
    for card, data in ((fast, images[1]), (first_block, images[2])):
        expected = _psnr(images[0], data)
        shown = _term(card, "PSNR")
        if math.isinf(expected):
            assert shown.startswith("∞")
        else:
            assert shown == f"{expected:.2f} dB"
    assert (
        first_block.locator(".card-policy").inner_text() == '{"method":"first_block_cache","threshold":0.3}'
    )

    # The copied command gives the same image, bit for bit.
    first_block.locator(".card-copy").click()
    first_block.locator(".card-copied", has_text="copied").wait_for()
    command: str = page.evaluate("() => navigator.clipboard.readText()")
    assert '-H "Authorization: Bearer $DITCACHE_API_KEY"' in command and KEY not in command
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:3] == ["curl", "-s", f"{server.base_url}/v1/generations"]
    body = json.loads(words[words.index("-d") + 1])
    assert body["cache"] == {"method": "first_block_cache", "threshold": 0.3} and body["seed"] == 42
    assert "-H" in words and "Accept: image/png" in words
    with server.client(headers=AUTH) as client:
        again = client.post("/v1/generations", json=body, headers={"Accept": "image/png"})
    assert again.status_code == 200 and again.content == images[2]

    # Everything the page asked for is its own files or an operation of the public API.
    with server.client() as client:
        public = client.get("/openapi.json").json()["paths"]
    patterns = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$") for path in public]
    for path in set(chromium.paths) - PAGE_FILES - {"/openapi.json"}:
        assert any(pattern.match(path) for pattern in patterns), f"{path} is not in the public API"
    assert {"/openapi.json", "/v1/models", "/v1/jobs"} <= set(chromium.paths)
    assert any(path.endswith("/events") for path in chromium.paths)


def test_a_bad_field_shows_the_servers_422_and_marks_the_field(page: Any) -> None:
    page.locator("#steps").fill("1000")
    policies = page.locator("#policy-list .policy")
    policies.nth(1).locator(".policy-kind").select_option(label="first_block_cache")
    policies.nth(1).locator('[data-field="threshold"] input').fill("11")
    page.locator("#run").click()
    page.locator('.card[data-status="failed"]').nth(2).wait_for(state="attached")
    uncached = _card(page, "uncached").locator(".card-error")
    assert uncached.inner_text().startswith("422 invalid_request: ")
    assert "field: steps" in uncached.inner_text() and "request id: req_" in uncached.inner_text()
    # The policy's own field is checked first, and blamed by name.
    policy_error = _card(page, "first_block_cache").locator(".card-error").inner_text()
    assert "422 invalid_request" in policy_error and "field: cache.threshold" in policy_error
    assert page.locator("#steps").get_attribute("aria-invalid") == "true"
    assert policies.nth(1).locator('[data-field="threshold"] input').get_attribute("aria-invalid") == "true"
    assert page.locator("#run").is_enabled()


@contextmanager
def _held(server: LiveServer, model: str) -> Iterator[threading.Event]:
    """Every denoiser call of ``model`` waits for the event: a job stays running until the test lets go."""
    generations = server.runtime.generations
    assert generations is not None
    release = threading.Event()

    def wait(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        release.wait(60)

    handle = generations.models[model].pipeline.transformer.register_forward_pre_hook(wait)
    try:
        yield release
    finally:
        release.set()
        handle.remove()


def test_cancel_stops_a_running_job_and_the_next_one_runs(page: Any, server: LiveServer) -> None:
    page.locator("#policy-list .policy .remove-policy").first.click()
    assert page.locator("#policy-list .policy").count() == 1
    with _held(server, DEFAULT_MODEL) as release:
        page.locator("#run").click()
        uncached = _card(page, "uncached")
        page.locator('.card[data-column="uncached"][data-status="running"]').wait_for(state="attached")
        # The policy's job waits behind it, and says so.
        _card(page, "preset quality").locator(".card-status", has_text="queued").wait_for()
        uncached.locator(".card-cancel").click()
        release.set()
        page.locator('.card[data-column="uncached"][data-status="cancelled"]').wait_for(state="attached")
    assert uncached.locator(".card-error").inner_text().startswith("cancelled: ")
    quality = _card(page, "preset quality")
    page.locator('.card[data-column="policy"][data-status="succeeded"]').wait_for(
        state="attached", timeout=60_000
    )
    assert _term(quality, "PSNR") == "– (the uncached run did not finish)"
    assert page.locator("#run").is_enabled()


def test_a_video_model_compares_its_frames(page: Any) -> None:
    page.locator("#model").select_option("tiny-wan")
    assert page.locator("#frames-field").is_visible()
    assert page.locator("#output_format").input_value() == "webp"
    page.locator("#steps").fill("3")
    page.locator("#policy-list .policy .remove-policy").first.click()
    page.locator("#run").click()
    page.locator('dd[data-term="PSNR"]', has_text="dB").wait_for(timeout=60_000)
    shown = _term(_card(page, "preset quality"), "PSNR")
    assert re.fullmatch(r"(∞ dB \(identical\)|[\d.]+ dB)", shown)
    assert _card(page, "uncached").locator(".card-media img").evaluate("img => img.naturalWidth") == 32
