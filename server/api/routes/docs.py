"""``/docs`` (Swagger UI) and ``/redoc``, with their scripts and styles served by this server.

FastAPI's own pages load them from a CDN, which a host without internet cannot reach: the page stays
blank. The files come from the ``fastapi-offline`` package, which ships the Swagger UI and ReDoc
bundles and follows their releases, so that updating them is a dependency bump and nothing is
vendored here. Only its files are used: the pages are FastAPI's, pointed at ``/docs/assets``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from server.errors import NotFound

router = APIRouter(include_in_schema=False)

ASSETS_PATH = "/docs/assets"
SWAGGER_OAUTH2_REDIRECT = "/docs/oauth2-redirect"
_ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
# The bundles change only with the package; a day keeps reloads cheap without pinning a stale copy.
_ASSET_CACHE = "public, max-age=86400"
# The browser's guarantee that the pages call nothing off this host: ReDoc 2 shows its maker's logo from
# its CDN in every sidebar, with no option to turn it off; blocked here, it falls back to plain text.
# FastAPI writes each page's start-up script inline, and ReDoc renders in a blob: worker with inline styles.
_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; worker-src 'self' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'self'"
)
_SWAGGER_PARAMETERS = {
    # Swagger UI's default sends the schema to validator.swagger.io for a badge: a request off the host.
    "validatorUrl": None,
}


def asset_url(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{ASSETS_PATH}/{name}"


def _openapi_url(request: Request) -> str:
    openapi_url = request.app.openapi_url
    assert openapi_url is not None, "the docs need the OpenAPI schema"
    return f"{request.scope.get('root_path', '')}{openapi_url}"


def _confined(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = _CSP
    return page


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=asset_url(request, "swagger-ui-bundle.js"),
        swagger_css_url=asset_url(request, "swagger-ui.css"),
        swagger_favicon_url=asset_url(request, "favicon.png"),
        oauth2_redirect_url=f"{request.scope.get('root_path', '')}{SWAGGER_OAUTH2_REDIRECT}",
        swagger_ui_parameters=_SWAGGER_PARAMETERS,
    )
    return _confined(page)


@router.get(SWAGGER_OAUTH2_REDIRECT)
async def swagger_ui_redirect() -> HTMLResponse:
    return _confined(get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    page = get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=asset_url(request, "redoc.standalone.js"),
        redoc_favicon_url=asset_url(request, "favicon.png"),
        with_google_fonts=False,
    )
    return _confined(page)


@router.get(ASSETS_PATH + "/{name}")
async def asset(name: str) -> FileResponse:
    # A fixed list, not a folder: nothing else of the package, and no path, can be asked for.
    if name not in _ASSETS:
        raise NotFound(f"no docs asset {name!r}")
    return FileResponse(_ASSETS_DIR / name, media_type=_ASSETS[name], headers={"Cache-Control": _ASSET_CACHE})
