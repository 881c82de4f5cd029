"""A finished generation over HTTP: raw media with its headers, and the choice between raw media and the JSON
envelope (whose body ``server.runtime.views`` builds)."""

from __future__ import annotations

import json

from fastapi.responses import Response

from server.errors import NotAcceptable
from server.models import media
from server.models.limits import Kind
from server.models.stages import StageTimings
from server.runtime.service import Finished
from server.runtime.views import stats_view

_JSON_RANGES = frozenset({"*/*", "application/*", "application/json"})
_EXTENSIONS = {"jpeg": "jpg"}


def server_timing(timings: StageTimings) -> str:
    return ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in timings.stages().items())


def result_headers(finished: Finished) -> dict[str, str]:
    """What a JSON body already says, for clients that read only headers (raw media)."""
    headers = {
        "Server-Timing": server_timing(finished.timings),
        "X-Seed": str(finished.prepared.params.seed),
        "X-Denoising-Steps-Ms": ",".join(f"{ms:.1f}" for ms in finished.timings.denoising_steps),
    }
    stats = stats_view(finished.stats)
    if stats is not None:
        headers["X-Cache-Stats"] = json.dumps(stats.model_dump(), separators=(",", ":"))
    return headers


def negotiate(accept: str | None, kind: Kind, requested: str | None) -> str | None:
    """The format the client wants as raw bytes, or None for the JSON envelope.

    Media ranges are tried by quality, then in the order written; ``*/*`` and JSON mean the
    envelope. ``requested`` is the body's ``output_format``, which a raw type has to agree with.
    """
    if not accept or not accept.strip():
        return None
    formats = media.MEDIA_TYPES[kind]
    preferred = [requested] if requested else [media.DEFAULT_FORMAT[kind], *formats]
    for media_range in _media_ranges(accept):
        if media_range in _JSON_RANGES:
            return None
        for fmt in preferred:
            if fmt in formats and _matches(media_range, formats[fmt]):
                return fmt
    offered = ", ".join(dict.fromkeys(formats[fmt] for fmt in preferred if fmt in formats))
    raise NotAcceptable(f"Accept {accept!r} matches none of: application/json, {offered}")


def raw_response(finished: Finished) -> Response:
    prepared = finished.prepared
    extension = _EXTENSIONS.get(prepared.output_format, prepared.output_format)
    headers = result_headers(finished)
    headers["Content-Disposition"] = f'inline; filename="{prepared.request_id}.{extension}"'
    return Response(finished.media[0], media_type=prepared.media_type, headers=headers)


def _media_ranges(accept: str) -> list[str]:
    ranked: list[tuple[float, int, str]] = []
    for order, part in enumerate(accept.split(",")):
        pieces = [piece.strip() for piece in part.split(";")]
        media_range = pieces[0].lower()
        quality = 1.0
        for parameter in pieces[1:]:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media_range and quality > 0:
            ranked.append((-quality, order, media_range))
    return [media_range for _, _, media_range in sorted(ranked)]


def _matches(media_range: str, media_type: str) -> bool:
    major, _, minor = media_range.partition("/")
    type_major, _, type_minor = media_type.partition("/")
    return major == type_major and minor in ("*", type_minor)
