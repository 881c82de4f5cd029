"""Encoders: every format decodes to the frames' size and count, and equal frames give equal bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
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


def _streams(data: bytes, tmp_path: Path) -> list[str]:
    """The stream lines ffmpeg prints for an mp4."""
    path = tmp_path / "probe.mp4"
    path.write_bytes(data)
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(path)], capture_output=True, text=True)
    return [line.strip() for line in probe.stderr.splitlines() if "Stream #" in line]


def test_an_mp4_carries_the_sound_made_with_its_video(tmp_path: Path) -> None:
    frames = _frames(8)
    rate = 16000
    # A second of a 440 Hz tone, louder on the left.
    time = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * 440 * time).astype(np.float32)
    sound = media.Soundtrack(np.stack([0.5 * tone, 0.2 * tone]), rate)
    with_sound = media.encode_video(frames, "mp4", 8, sound)
    streams = _streams(with_sound, tmp_path)
    assert any("Video: h264" in line for line in streams)
    assert any("Audio: aac" in line and f"{rate} Hz" in line and "stereo" in line for line in streams)
    # Deterministic, as every encoder here, and the silent video has no sound track.
    assert media.encode_video(frames, "mp4", 8, sound) == with_sound
    assert not any("Audio" in line for line in _streams(media.encode_video(frames, "mp4", 8), tmp_path))
