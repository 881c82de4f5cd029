"""Encoders: every format decodes to the frames' size and count, and equal frames give equal bytes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from server.models import media

from .conftest import decode_image, decode_video


def _frames(count: int, width: int = 48, height: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_images_decode_to_their_size(fmt: str) -> None:
    (frame,) = _frames(1)
    data = media.encode_image(frame, fmt)
    decoded = decode_image(data)
    assert decoded.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    assert decoded.size == (48, 32)
    assert data == media.encode_image(frame, fmt)
    if fmt == "png":
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(frame))


@pytest.mark.parametrize("fmt", ["mp4", "gif", "webp"])
def test_videos_decode_to_their_size_and_frame_count(fmt: str) -> None:
    frames = _frames(7)
    data = media.encode_video(frames, fmt, fps=8)
    assert decode_video(data, fmt) == ((48, 32), 7)
    assert data == media.encode_video(frames, fmt, fps=8)


def test_animations_carry_the_frame_rate() -> None:
    data = media.encode_video(_frames(3), "gif", fps=10)
    assert decode_image(data).info["duration"] == 100


def test_mp4_refuses_an_odd_size() -> None:
    with pytest.raises(ValueError, match="even"):
        media.encode_video(_frames(2, width=33), "mp4", fps=8)
    assert not media.mp4_size_ok(33, 32) and media.mp4_size_ok(32, 32)


def test_unknown_formats_are_errors() -> None:
    with pytest.raises(ValueError):
        media.encode_image(_frames(1)[0], "bmp")
    with pytest.raises(ValueError):
        media.encode_video(_frames(2), "avi", fps=8)
