"""Accept header → JSON envelope or raw media, and the Server-Timing header."""

from __future__ import annotations

import pytest

from server.api.responses import negotiate, server_timing
from server.errors import NotAcceptable
from server.models.stages import StageTimings


@pytest.mark.parametrize(
    ("accept", "kind", "requested", "expected"),
    [
        (None, "image", None, None),
        ("", "image", None, None),
        ("*/*", "image", None, None),
        ("application/json", "video", "gif", None),
        ("image/png", "image", None, "png"),
        ("image/jpeg", "image", None, "jpeg"),
        ("image/*", "image", None, "png"),
        ("image/*", "image", "webp", "webp"),
        ("video/mp4", "video", None, "mp4"),
        ("image/gif", "video", None, "gif"),
        ("image/webp", "video", None, "webp"),
        ("image/webp", "image", "webp", "webp"),
        # Quality first, then the order written.
        ("application/json;q=0.5, image/png", "image", None, "png"),
        ("image/png, application/json", "image", None, "png"),
        ("application/json, image/png", "image", None, None),
        ("image/png;q=0, */*", "image", None, None),
        ("text/html, image/jpeg;q=0.9", "image", None, "jpeg"),
    ],
)
def test_negotiate(accept: str | None, kind: str, requested: str | None, expected: str | None) -> None:
    assert negotiate(accept, kind, requested) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("accept", "kind", "requested"),
    [
        ("text/html", "image", None),
        ("video/mp4", "image", None),
        ("image/png", "video", None),
        # A raw type must agree with the body's output_format.
        ("image/jpeg", "image", "png"),
    ],
)
def test_negotiate_refuses(accept: str, kind: str, requested: str | None) -> None:
    with pytest.raises(NotAcceptable):
        negotiate(accept, kind, requested)  # type: ignore[arg-type]


def test_server_timing_lists_every_stage() -> None:
    timings = StageTimings(
        queue_wait=1,
        pipeline={"text_encoding": 2, "denoising": 3.25, "decoding": 4},
        denoising_steps=[1.5, 1.75],
        encoding=5,
        total=15.25,
    )
    assert server_timing(timings) == (
        "queue_wait;dur=1.0, text_encoding;dur=2.0, denoising;dur=3.2, decoding;dur=4.0, "
        "encoding;dur=5.0, total;dur=15.2"
    )
    # A stage the pipeline does not have is left out, not written as 0.
    without_text = StageTimings(1, {"denoising": 3.25}, [3.25], 5, 9.25)
    assert "text_encoding" not in server_timing(without_text)
