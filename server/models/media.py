"""Encode generated frames: PNG / JPEG / WebP images, MP4 / GIF / animated WebP videos.

Every encoder is deterministic for the same frames, so that equal requests give equal bytes. A video
made with sound (LTX-2) carries it in MP4, as AAC; GIF and WebP have no sound track.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

from server.models.limits import Kind

MEDIA_TYPES: Mapping[Kind, Mapping[str, str]] = {
    "image": {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"},
    "video": {"mp4": "video/mp4", "gif": "image/gif", "webp": "image/webp"},
}
DEFAULT_FORMAT: Mapping[Kind, str] = {"image": "png", "video": "mp4"}

_JPEG_QUALITY = 90
_WEBP_QUALITY = 90
# x264's constant-quality mode: 18 is visually lossless for most content.
_MP4_CRF = "18"


def media_type(kind: Kind, fmt: str) -> str:
    return MEDIA_TYPES[kind][fmt]


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=_WEBP_QUALITY)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buffer.getvalue()


@dataclass(frozen=True)
class Soundtrack:
    """Sound made with a video: samples in [-1, 1], one row per channel, at ``rate`` per second."""

    samples: np.ndarray
    rate: int


def encode_video(frames: Sequence[Image.Image], fmt: str, fps: int, sound: Soundtrack | None = None) -> bytes:
    if not frames:
        raise ValueError("a video needs at least one frame")
    if fmt == "mp4":
        return _encode_mp4(frames, fps, sound)
    if fmt in ("gif", "webp"):
        return _encode_animation(frames, fmt, fps)
    raise ValueError(f"unknown video format {fmt!r}")


def encode(
    kind: Kind,
    fmt: str,
    item: Image.Image | Sequence[Image.Image],
    fps: int | None,
    sound: Soundtrack | None = None,
) -> bytes:
    if kind == "image":
        assert isinstance(item, Image.Image)
        return encode_image(item, fmt)
    assert not isinstance(item, Image.Image) and fps is not None
    return encode_video(item, fmt, fps, sound)


def mp4_size_ok(width: int, height: int) -> bool:
    # H.264 in yuv420p subsamples chroma by 2 in both directions.
    return width % 2 == 0 and height % 2 == 0


def _encode_animation(frames: Sequence[Image.Image], fmt: str, fps: int) -> bytes:
    buffer = io.BytesIO()
    rgb = [frame.convert("RGB") for frame in frames]
    duration = max(1, round(1000 / fps))
    options: dict[str, object] = {"save_all": True, "append_images": rgb[1:], "duration": duration, "loop": 0}
    if fmt == "gif":
        rgb[0].save(buffer, format="GIF", **options)
    else:
        rgb[0].save(buffer, format="WEBP", quality=_WEBP_QUALITY, **options)
    return buffer.getvalue()


def _encode_mp4(frames: Sequence[Image.Image], fps: int, sound: Soundtrack | None) -> bytes:
    width, height = frames[0].size
    if not mp4_size_ok(width, height):
        raise ValueError(f"mp4 needs an even width and height, got {width}x{height}")
    # The mp4 muxer seeks back to write its index, so ffmpeg writes to a file, not a pipe.
    with tempfile.TemporaryDirectory(prefix="ditcache-") as folder:
        path = Path(folder) / "video.mp4"
        writer = imageio_ffmpeg.write_frames(
            str(path),
            (width, height),
            fps=fps,
            codec="libx264",
            quality=None,
            macro_block_size=1,
            ffmpeg_log_level="error",
            # bitexact: no encoder version or creation time in the file, so equal frames give equal bytes.
            output_params=[
                "-crf",
                _MP4_CRF,
                "-movflags",
                "+faststart",
                "-map_metadata",
                "-1",
                "-fflags",
                "+bitexact",
                "-flags:v",
                "+bitexact",
            ],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(np.asarray(frame.convert("RGB"), dtype=np.uint8)))
        writer.close()
        if sound is not None:
            path = _with_sound(path, sound)
        return path.read_bytes()


def _with_sound(video: Path, sound: Soundtrack) -> Path:
    """``video`` with ``sound`` as its AAC track, in a new file beside it."""
    pcm = np.clip(np.asarray(sound.samples, dtype=np.float32), -1.0, 1.0)
    if pcm.ndim == 1:
        pcm = pcm[None]
    track = video.with_name("sound.wav")
    with wave.open(str(track), "wb") as wav:
        wav.setnchannels(pcm.shape[0])
        wav.setsampwidth(2)
        wav.setframerate(sound.rate)
        wav.writeframes((pcm.T * 32767.0).round().astype("<i2").tobytes())
    muxed = video.with_name("with-sound.mp4")
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-loglevel",
        "error",
        "-i",
        str(video),
        "-i",
        str(track),
        "-map",
        "0:v",
        "-map",
        "1:a",
        "-c:v",
        "copy",
        "-c:a",
        "aac",
        "-b:a",
        "128k",
        "-movflags",
        "+faststart",
        "-map_metadata",
        "-1",
        # bitexact, as for the video: equal sound gives equal bytes.
        "-fflags",
        "+bitexact",
        "-flags:a",
        "+bitexact",
        str(muxed),
    ]
    subprocess.run(command, check=True, capture_output=True)
    return muxed
