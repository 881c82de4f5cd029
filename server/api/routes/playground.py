"""``/playground``: one page to run a prompt uncached and under a few cache policies, side by side.

The page is plain HTML, CSS and JavaScript from ``server/static``, with no build step. Everything
it shows it gets from the public API (``/openapi.json``, ``/v1/models``, ``/v1/jobs`` and its
events), with the key a script would send: no route exists for the page alone but these files.
Gradio mounted on the app was the alternative; it would bring a second web framework, its own
front-end bundle and its own queue and API beside ours, for one form and a grid of results.

With API keys, the page is behind them as well (any tenant's key opens it, for that tenant). A browser opening a page cannot send a Bearer
header, so the page also takes the key as the password of HTTP Basic (any user name), which the
browser asks for; the page then needs the same key for its API calls, and gets it written into the
HTML of that one answer, which is never cached, framed, or sent to any other origin.
"""

from __future__ import annotations

import base64
import binascii
import html
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from server import errors
from server.api import envelope
from server.api.auth import tenant_of
from server.api.request_id import request_id_of
from server.api.routes.docs import asset_url

router = APIRouter(include_in_schema=False)

_STATIC = Path(str(files("server") / "static"))
_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
_KEY_MARK = "{{api_key}}"
_FAVICON_MARK = "{{favicon}}"
_HEADERS = {
    # The page may carry the key: no cache keeps it, no other site frames it or learns its address.
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # Everything the page loads or calls is on this server; media arrive as data: and blob: URLs.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
}


def _given_key(request: Request) -> str | None:
    """The key in ``Authorization``: a Bearer token, or the password of HTTP Basic."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def _check_key(request: Request) -> tuple[str, Response | None]:
    """(the key the page should send, or ""; a 401 to answer instead, or None)."""
    keys = request.app.state.runtime.settings.tenant_keys
    if not keys:
        return "", None
    given = _given_key(request)
    if given is not None and tenant_of(given, keys) is not None:
        return given, None
    message = (
        "the playground needs the server's API key: give it as the password (any user name)"
        if given is None
        else "the API key is not valid"
    )
    headers = {**_HEADERS, "WWW-Authenticate": 'Basic realm="ditcache", charset="UTF-8"'}
    return "", envelope.envelope(401, "unauthorized", message, request_id_of(request), headers=headers)


@router.get("/playground", response_class=HTMLResponse)
async def page(request: Request) -> Response:
    key, refusal = _check_key(request)
    if refusal is not None:
        return refusal
    text = (_STATIC / "playground.html").read_text(encoding="utf-8")
    text = text.replace(_KEY_MARK, html.escape(key, quote=True))
    text = text.replace(_FAVICON_MARK, html.escape(asset_url(request, "favicon.png"), quote=True))
    return HTMLResponse(text, headers=_HEADERS)


@router.get("/playground/{name}")
async def asset(request: Request, name: str) -> Response:
    _, refusal = _check_key(request)
    if refusal is not None:
        return refusal
    if name not in _FILES:
        raise errors.NotFound(f"no playground file {name!r}")
    return FileResponse(_STATIC / name, media_type=_FILES[name], headers=_HEADERS)
