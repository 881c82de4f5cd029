"""/docs and /redoc on a host that reaches nothing: their files come from this server, none from a CDN.

The pages are driven by headless Chromium (Debian's ``chromium``, which ``make test`` installs when it
is missing), through Playwright, with every request that is not to the test server recorded and
refused: a page that needed one would render blank here, as it did on the air-gapped hosts.
``browser()`` is shared with the playground's tests.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import LiveServer, error_of, live_server

# Chromium phones home for updates, field trials and safe browsing unless told not to; on a closed
# network those requests hang and retry. QUIC is off for the same reason.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]
NO_CHROMIUM = (
    "Debian's chromium is not installed and could not be installed here: `make test` (and .ci/run) "
    "installs it as root with apt-get; set DITCACHE_CHROMIUM to use another Chromium binary"
)


def chromium_path() -> str | None:
    return os.environ.get("DITCACHE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """A fresh headless Chromium profile; ``outside`` lists each request that was not to ``base_url``."""

    def __init__(self, context: Any, base_url: str) -> None:
        self.context = context
        self.base_url = base_url
        self.outside: list[str] = []
        # Every path asked of the server, for the checks on what the pages call.
        self.paths: list[str] = []
        context.route("**/*", self._route)

    def _route(self, route: Any) -> None:
        url: str = route.request.url
        if url.startswith(self.base_url + "/"):
            self.paths.append(url.removeprefix(self.base_url).split("?")[0])
            route.continue_()
        elif url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.outside.append(url)
            route.abort()

    def new_page(self) -> Any:
        page = self.context.new_page()
        page.set_default_timeout(30_000)
        return page


@contextmanager
def browser(base_url: str, **context_options: Any) -> Iterator[Browser]:
    """Headless Chromium with its own profile, for the block; skipped only where it cannot run at all."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extras")
    path = chromium_path()
    if path is None:
        pytest.skip(NO_CHROMIUM)
    with (
        sync_api.sync_playwright() as playwright,
        tempfile.TemporaryDirectory(prefix="ditcache-chromium-", ignore_cleanup_errors=True) as profile,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=path,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
            **context_options,
        )
        try:
            yield Browser(context, base_url)
        finally:
            context.close()


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    # The docs need no model; the smallest one makes the server ready.
    yield from live_server(model_cache, models=["tiny-flux"])


@pytest.fixture(scope="module")
def chromium(server: LiveServer) -> Iterator[Browser]:
    with browser(server.base_url) as opened:
        yield opened


def _operations(client: httpx.Client) -> dict[tuple[str, str], str]:
    """(METHOD, path) of every operation in the schema, with its operationId."""
    schema = client.get("/openapi.json").json()
    return {
        (method.upper(), path): operation["operationId"]
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }


# -- over HTTP: what the pages link to ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_pages_name_no_other_host(client: httpx.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", response.text)
    assert links and all(link.startswith("/") for link in links), links
    assert "cdn." not in response.text and "fonts.googleapis" not in response.text
    # The browser refuses anything off the host, whatever a future bundle asks for.
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data: blob:" in policy


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("swagger-ui-bundle.js", "text/javascript"),
        ("swagger-ui.css", "text/css"),
        ("redoc.standalone.js", "text/javascript"),
        ("favicon.png", "image/png"),
    ],
)
def test_the_assets_come_from_the_installed_package(client: httpx.Client, name: str, media_type: str) -> None:
    response = client.get(f"/docs/assets/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert len(response.content) > 1000


@pytest.mark.parametrize("name", ["nothing.js", "..%2F__init__.py", "core.py"])
def test_only_the_listed_assets_are_served(client: httpx.Client, name: str) -> None:
    response = client.get(f"/docs/assets/{name}")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_the_pages_are_not_operations_of_the_api(client: httpx.Client) -> None:
    paths = {path for _, path in _operations(client)}
    assert not {path for path in paths if path.startswith(("/docs", "/redoc", "/playground"))}


# -- in a browser: the pages render every operation, with no request off the host ----------------------


def test_swagger_ui_renders_every_operation_offline(chromium: Browser, client: httpx.Client) -> None:
    page = chromium.new_page()
    page.goto(chromium.base_url + "/docs")
    summaries = page.locator(".opblock-summary")
    summaries.first.wait_for()
    shown = {
        (
            summary.locator(".opblock-summary-method").inner_text(),
            summary.locator(".opblock-summary-path").get_attribute("data-path"),
        )
        for summary in summaries.all()
    }
    assert shown == set(_operations(client))
    # An operation opens, with what it answers read from /openapi.json.
    page.locator(".opblock-summary", has_text="/v1/jobs/{job_id}/events").first.click()
    page.locator(".opblock-body .responses-inner").first.wait_for()
    assert page.locator('.opblock-body option[value="text/event-stream"]').count() >= 1
    page.close()
    assert chromium.outside == []
    assert {"/openapi.json", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= set(
        chromium.paths
    )


def test_redoc_renders_every_operation_offline(chromium: Browser, client: httpx.Client) -> None:
    page = chromium.new_page()
    page.goto(chromium.base_url + "/redoc")
    page.locator("h1", has_text="ditcache").wait_for()
    operations = _operations(client)
    for operation_id in operations.values():
        page.locator(f'[data-section-id="operation/{operation_id}"]').wait_for(state="attached")
    rendered = page.locator('[data-section-id^="operation/"]').count()
    assert rendered == len(operations)
    page.close()
    # ReDoc's own logo, asked of its CDN, is refused by the page's policy before it leaves the browser.
    assert chromium.outside == []
    assert "/docs/assets/redoc.standalone.js" in chromium.paths
