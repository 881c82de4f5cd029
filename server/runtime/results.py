"""Whole results kept for requests that allow their reuse (``"reuse": "exact"``): an identical request is
answered with the very bytes an earlier one got.

A result is keyed by everything that decides its bytes: the model, every generation parameter with its
defaults filled in (the seed included), the image and mask it started from, the engine config it ran,
and the output format. A request without a seed of its own is never answered from here, nor kept: its
seed is drawn anew each time. Bounded in bytes, the least recently used result leaving first; it
empties with the process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cache_engine import SessionStats
from server.models.bounded import BytesBoundedLRU

if TYPE_CHECKING:
    from collections.abc import Sequence

    from PIL import Image

    from server.models.generation import GenerationParams

__all__ = ["ResultCache", "Stored", "result_key"]


@dataclass(frozen=True)
class Stored:
    """What an identical request is answered with."""

    media: Sequence[bytes]
    stats: SessionStats | None
    # The request that computed it: the answer names it.
    request_id: str


def result_key(
    tenant: str, model: str, params: GenerationParams, config: object, output_format: str, fps: int | None
) -> str:
    """The digest of everything that decides a result's bytes, and of who may have it back."""
    digest = hashlib.sha256()
    fields = (
        tenant,
        model,
        params.prompt,
        params.negative_prompt,
        params.width,
        params.height,
        params.num_frames,
        params.steps,
        params.guidance_scale,
        params.seed,
        params.n,
        params.fps,
        params.strength,
        params.task,
        params.loras,
        output_format,
        fps,
        # A frozen dataclass's repr names every field and its value: the engine config as it ran.
        repr(config),
    )
    digest.update(repr(fields).encode())
    for image in (params.image, params.mask, *params.more_images):
        digest.update(b"|" + _pixels_digest(image))
    return digest.hexdigest()


def _pixels_digest(image: Image.Image | None) -> bytes:
    if image is None:
        return b"none"
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).digest()


class ResultCache:
    def __init__(self, max_bytes: int) -> None:
        self._entries: BytesBoundedLRU[Stored] = BytesBoundedLRU(max_bytes)

    @property
    def bytes(self) -> int:
        return self._entries.bytes

    def get(self, key: str) -> Stored | None:
        return self._entries.get(key)

    def put(self, key: str, stored: Stored) -> None:
        self._entries.put(key, stored, sum(len(item) for item in stored.media))
