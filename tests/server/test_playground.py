"""/playground, as a person uses it: headless Chromium runs policies, reads the numbers, copies a command.

The server has an API key, so every test also goes through the page's key handling: the browser gives
the key as HTTP Basic credentials, as a person types it into the browser's prompt, and the page sends
it on to the API as a Bearer token. No request may leave the test server (see ``test_docs_offline``).
Images in are given as a person gives them: a file chosen in the file dialog, or dropped on the page.
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
from tiny_pipelines import tiny_pipeline

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
def kontext_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An edit model (tasks text_to_image and edit): Flux Kontext on the tiny Flux's components."""
    from diffusers import FluxKontextPipeline

    path = tmp_path_factory.mktemp("playground-kontext") / "kontext"
    # Typed Any: diffusers exports its pipelines lazily, and mypy misses their inherited methods.
    pipeline: Any = FluxKontextPipeline(**tiny_pipeline("flux").build().components)
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(model_cache: Path, kontext_folder: Path) -> Iterator[LiveServer]:
    # The default model first, as `make serve` has it; a video model for the frames; the tiny Flux for
    # image-to-image and inpainting, and an edit model.
    models = [DEFAULT_MODEL, "tiny-wan", "tiny-flux", str(kontext_folder)]
    yield from live_server(model_cache, models=models, api_key=KEY)


@pytest.fixture(scope="module")
def chromium(server: LiveServer) -> Iterator[Browser]:
    credentials = {"username": "me", "password": KEY}
    with browser(server.base_url, http_credentials=credentials) as opened:
        opened.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base_url)
        yield opened


@pytest.fixture
def page(chromium: Browser) -> Iterator[Any]:
    page = chromium.new_page()
    # What the page's Content-Security-Policy refused (previews of images in are data: URLs, say).
    refused: list[str] = []
    page.on(
        "console",
        lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None,
    )
    page.goto(chromium.base_url + "/playground")
    page.locator("body[data-ready=true]").wait_for(state="attached")
    yield page
    page.close()
    assert chromium.outside == [], "the page asked for something off the host"
    assert refused == [], "the page's Content-Security-Policy refused what it did"


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


def test_the_default_models_adapter_goes_into_every_column(page: Any, server: LiveServer) -> None:
    """shapes-flux holds its outline adapter (as `make serve` has it): chosen once, with a scale, it goes
    into every column's request, and each card says so."""
    assert page.locator("#adapters").is_visible()
    adapter = page.locator('#adapter-list .adapter[data-name="outline"]')
    adapter.locator(".adapter-use").check()
    adapter.locator(".adapter-scale").fill("0.8")
    page.locator("#policy-list .policy .remove-policy").nth(1).click()
    page.locator("#run").click()
    page.locator('.card[data-status="succeeded"]').nth(1).wait_for(state="attached", timeout=60_000)
    for title in ("uncached", "preset fast"):
        assert _term(_card(page, title), "adapters") == "outline ×0.8"

    # The uncached column is what the API gives for the same request with the adapter.
    body = page.evaluate("() => readRequest()")
    assert body["loras"] == [{"name": "outline", "scale": 0.8}]
    with server.client(headers=AUTH) as client:
        direct = client.post("/v1/generations", json=body, headers={"Accept": "image/png"})
    assert direct.status_code == 200 and direct.content == _media_bytes(_card(page, "uncached"))

    # A model without adapters shows no choice, and its requests name none.
    page.locator("#model").select_option("tiny-wan")
    assert not page.locator("#adapters").is_visible()
    assert "loras" not in page.evaluate("() => readRequest()")


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


# -- images in ----------------------------------------------------------------------------------------

IMAGE_WIDTH, IMAGE_HEIGHT = 48, 32
IMAGE_CONTROLS = ("#image-input", "#mask", "#strength-field")


def _png(width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_png(width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT) -> bytes:
    """OpenAI's convention: the transparent left half is what to change."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _job_bodies(page: Any) -> list[dict[str, Any]]:
    """The body of every job the page submits from now on, in order."""
    bodies: list[dict[str, Any]] = []

    def seen(request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/v1/jobs"):
            bodies.append(request.post_data_json)

    page.on("request", seen)
    return bodies


def _drop(page: Any, selector: str, name: str, data: bytes) -> None:
    """Drags a file from the desktop onto the element: dragenter, dragover and drop, as a browser sends."""
    page.evaluate(
        """([selector, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            const zone = document.querySelector(selector);
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
            }
        }""",
        [selector, name, base64.b64encode(data).decode("ascii")],
    )


def _visible(page: Any) -> tuple[bool, ...]:
    return tuple(page.locator(selector).is_visible() for selector in IMAGE_CONTROLS)


def _wait_for_columns(page: Any, status: str, count: int = 3, timeout: float = 60_000) -> None:
    page.locator(f'.card[data-status="{status}"]').nth(count - 1).wait_for(state="attached", timeout=timeout)
    assert page.locator(".card").count() == count


def test_an_image_in_runs_image_to_image_in_every_column(
    page: Any, server: LiveServer, tmp_path: Path
) -> None:
    page.locator("#model").select_option("tiny-flux")
    assert _visible(page) == (True, True, True)
    page.locator("#steps").fill("4")
    image = _png()
    page.locator("#image-file").set_input_files(_file(tmp_path, "in.png", image))
    zone = page.locator('#image[data-state="ready"]')
    zone.wait_for()
    # The preview shows (a data: URL, which the page's Content-Security-Policy allows), with the size.
    assert zone.locator(".preview").evaluate("img => img.complete && img.naturalWidth") == IMAGE_WIDTH
    assert zone.locator(".drop-info").inner_text() == f"in.png, {IMAGE_WIDTH}×{IMAGE_HEIGHT}"
    # The size is left to the image: the fields are emptied and say what it will be.
    for field, side in (("#width", IMAGE_WIDTH), ("#height", IMAGE_HEIGHT)):
        assert page.locator(field).input_value() == ""
        assert page.locator(field).get_attribute("placeholder") == f"{side} (image)"
    bodies = _job_bodies(page)
    page.locator("#run").click()
    _wait_for_columns(page, "succeeded")
    page.locator('dd[data-term="PSNR"]', has_text="dB").nth(1).wait_for()

    assert len(bodies) == 3
    for body in bodies:
        assert body["image"] == _data_url(image)
        assert not {"width", "height", "mask", "strength"} & set(body)
    cards = [_card(page, title) for title in ("uncached", "preset fast", "preset quality")]
    for card in cards:
        assert _term(card, "task") == "image_to_image"
        assert _term(card, "strength") == "0.6"
        assert re.fullmatch(r"[\d.]+ ms, \d+ steps", _term(card, "denoising"))
        assert Image.open(io.BytesIO(_media_bytes(card))).size == (IMAGE_WIDTH, IMAGE_HEIGHT)
    assert re.fullmatch(r"(∞ dB \(identical\)|[\d.]+ dB)", _term(cards[1], "PSNR"))

    # The copied command carries the image and gives the same picture.
    cards[1].locator(".card-copy").click()
    cards[1].locator(".card-copied", has_text="copied").wait_for()
    command: str = page.evaluate("() => navigator.clipboard.readText()")
    words = shlex.split(command.replace("\\\n", " "))
    body = json.loads(words[words.index("-d") + 1])
    assert body["image"] == _data_url(image) and body["cache"] == {"preset": "fast"}
    with server.client(headers=AUTH) as client:
        again = client.post("/v1/generations", json=body, headers={"Accept": "image/png"})
    assert again.status_code == 200 and again.content == _media_bytes(cards[1])


def test_a_mask_makes_it_inpainting(page: Any, tmp_path: Path) -> None:
    page.locator("#model").select_option("tiny-flux")
    page.locator("#steps").fill("4")
    page.locator("#strength").fill("0.8")
    image, mask = _png(seed=1), _mask_png()
    # The image dropped on its zone; the mask chosen in the file dialog.
    _drop(page, "#image", "dropped.png", image)
    page.locator('#image[data-state="ready"]').wait_for()
    assert page.locator("#image .drop-info").inner_text() == f"dropped.png, {IMAGE_WIDTH}×{IMAGE_HEIGHT}"
    page.locator("#mask-file").set_input_files(_file(tmp_path, "mask.png", mask))
    page.locator('#mask[data-state="ready"]').wait_for()
    assert page.locator("#mask .preview").evaluate("img => img.naturalWidth") == IMAGE_WIDTH
    bodies = _job_bodies(page)
    page.locator("#run").click()
    _wait_for_columns(page, "succeeded")

    assert len(bodies) == 3
    for body in bodies:
        assert body["image"] == _data_url(image) and body["mask"] == _data_url(mask)
        assert body["strength"] == 0.8 and not {"width", "height"} & set(body)
    given = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    for title in ("uncached", "preset fast", "preset quality"):
        card = _card(page, title)
        assert _term(card, "task") == "inpainting" and _term(card, "strength") == "0.8"
        result = np.asarray(Image.open(io.BytesIO(_media_bytes(card))).convert("RGB"))
        assert result.shape == given.shape
        # Only the masked half may change.
        assert np.array_equal(result[:, IMAGE_WIDTH // 2 :], given[:, IMAGE_WIDTH // 2 :])

    # Cleared, the mask is no longer sent: the next run is image-to-image.
    page.locator("#mask .drop-clear").click()
    assert not page.locator("#mask .drop-preview").is_visible()
    assert "mask" not in page.evaluate("() => readRequest()")


def test_the_image_controls_follow_the_models_tasks(page: Any, tmp_path: Path) -> None:
    assert _visible(page) == (True, True, True)  # shapes-flux: image-to-image and inpainting
    page.locator("#model").select_option("tiny-wan")
    assert _visible(page) == (False, False, False)
    # An edit model takes an image, and inpaints behind a mask at a strength.
    page.locator("#model").select_option("kontext")
    assert _visible(page) == (True, True, True)

    page.locator("#model").select_option("tiny-flux")
    page.locator("#strength").fill("0.5")
    page.locator("#image-file").set_input_files(_file(tmp_path, "in.png", _png()))
    page.locator('#image[data-state="ready"]').wait_for()
    page.locator("#mask-file").set_input_files(_file(tmp_path, "mask.png", _mask_png()))
    page.locator('#mask[data-state="ready"]').wait_for()
    request = page.evaluate("() => readRequest()")
    assert {"image", "mask", "strength"} <= set(request) and not {"width", "height"} & set(request)
    # Hidden controls send nothing: the video model gets a plain text-to-video request...
    page.locator("#model").select_option("tiny-wan")
    request = page.evaluate("() => readRequest()")
    assert not {"image", "mask", "strength"} & set(request)
    assert (request["width"], request["height"]) == (32, 32)
    # ...and the edit model, with the mask, an inpainting at the strength; without it, the image alone (an
    # edit takes no strength).
    page.locator("#model").select_option("kontext")
    request = page.evaluate("() => readRequest()")
    assert {"image", "mask", "strength"} <= set(request) and not {"width", "height"} & set(request)
    page.locator("#mask .drop-clear").click()
    request = page.evaluate("() => readRequest()")
    assert "image" in request and not {"mask", "strength", "width", "height"} & set(request)

    # The size: the image's until the user sets one, the model's defaults once the image is cleared.
    page.locator("#model").select_option("tiny-flux")
    assert page.locator("#width").input_value() == ""
    page.locator("#image .drop-clear").click()
    assert not page.locator("#image .drop-preview").is_visible()
    assert (page.locator("#width").input_value(), page.locator("#height").input_value()) == ("64", "64")
    page.locator("#width").fill("40")
    page.locator("#image-file").set_input_files(_file(tmp_path, "in.png", _png()))
    page.locator('#image[data-state="ready"]').wait_for()
    request = page.evaluate("() => readRequest()")
    assert (request["width"], request["height"]) == (40, 64) and "image" in request


def test_a_file_that_is_no_image_shows_the_servers_422_and_marks_the_image(page: Any, tmp_path: Path) -> None:
    page.locator("#model").select_option("tiny-flux")
    page.locator("#image-file").set_input_files(
        _file(tmp_path, "notes.png", b"these are notes, not a picture\n")
    )
    zone = page.locator('#image[data-state="unreadable"]')
    zone.wait_for()
    assert "not an image this browser can show" in zone.locator(".drop-info").inner_text()
    page.locator("#run").click()
    _wait_for_columns(page, "failed")
    for title in ("uncached", "preset fast", "preset quality"):
        error = _card(page, title).locator(".card-error").inner_text()
        assert error.startswith("422 invalid_request: ") and "field: image" in error
        assert "request id: req_" in error
    assert page.locator("#image").get_attribute("aria-invalid") == "true"
    assert page.locator("#image").evaluate("zone => getComputedStyle(zone).outlineStyle") == "solid"
    assert page.locator("#run").is_enabled()

    # A strength with no image is refused by name too, and its field outlined.
    page.locator("#image .drop-clear").click()
    page.locator("#strength").fill("0.5")
    page.locator("#run").click()
    _card(page, "uncached").locator(".card-error", has_text="field: strength").wait_for()
    assert page.locator("#strength").get_attribute("aria-invalid") == "true"
    assert page.locator("#image").get_attribute("aria-invalid") is None


def test_an_edit_model_edits_a_large_image_and_curl_reads_its_body_from_stdin(
    page: Any, server: LiveServer, tmp_path: Path
) -> None:
    page.locator("#model").select_option("kontext")
    page.locator("#steps").fill("3")
    page.locator("#policy-list .policy .remove-policy").first.click()
    # Over 128 KiB of base64: more than Linux takes in one argument.
    width, height = 224, 160
    image = _png(width, height, seed=2)
    assert len(_data_url(image)) > 128 * 1024
    page.locator("#image-file").set_input_files(_file(tmp_path, "large.png", image))
    page.locator('#image[data-state="ready"]').wait_for()
    bodies = _job_bodies(page)
    page.locator("#run").click()
    _wait_for_columns(page, "succeeded", count=2)
    assert [body["image"] for body in bodies] == [_data_url(image)] * 2
    assert not {"strength", "mask"} & set(bodies[0])
    quality = _card(page, "preset quality")
    for card in (_card(page, "uncached"), quality):
        assert _term(card, "task") == "edit"
        assert card.locator('dd[data-term="strength"]').count() == 0
        assert Image.open(io.BytesIO(_media_bytes(card))).size == (width, height)

    quality.locator(".card-copy").click()
    quality.locator(".card-copied", has_text="copied").wait_for()
    command: str = page.evaluate("() => navigator.clipboard.readText()")
    head, body_line, end = command.rsplit("\n", 2)
    assert head.endswith(" <<'JSON'") and end == "JSON"
    words = shlex.split(head.removesuffix(" <<'JSON'").replace("\\\n", " "))
    assert words[:3] == ["curl", "-s", f"{server.base_url}/v1/generations"]
    assert "--data-binary" in words and words[words.index("--data-binary") + 1] == "@-"
    body = json.loads(body_line)
    assert body["image"] == _data_url(image) and body["model"] == "kontext"
    with server.client(headers=AUTH) as client:
        again = client.post("/v1/generations", json=body, headers={"Accept": "image/png"})
    assert again.status_code == 200 and again.content == _media_bytes(quality)
