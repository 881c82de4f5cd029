"""Images a request brings: decoded with bounds checked before any pixel is, and masks read as OpenAI
writes them.

An upload is base64 text, bare or as a ``data:`` URL. Its bytes are bounded before it is decoded from
base64; its format (PNG, JPEG or WebP) and its size come from the file's header, so a decompression bomb
is refused before its pixels are. A mask is a PNG whose transparent pixels (alpha 0) are the ones to
change, as in OpenAI's image edits; the pipelines take the converse, white where they paint, which
``mask_from_alpha`` gives them.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

__all__ = ["FORMATS", "InvalidUpload", "decode_image", "mask_from_alpha"]

# What an upload may be, by PIL's name for it.
FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)


class InvalidUpload(ValueError):
    """An upload refused, and the request field it came in."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def decode_image(data: str | bytes, *, param: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """The image in ``data`` (base64 text, or a file's bytes), fully loaded, in RGB or RGBA.

    Raises InvalidUpload naming ``param`` for more than ``max_bytes`` bytes, a format other than PNG,
    JPEG or WebP, more than ``max_pixels`` pixels, or bytes that are no such image.
    """
    raw = _bytes(data, param=param, max_bytes=max_bytes)
    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, about large images: the bound below is checked first, from the header.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidUpload(
                    f"{param} is {width}x{height}, over the {max_pixels} pixels this model takes", param=param
                )
            image.load()
    except InvalidUpload:
        raise
    except (OSError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidUpload(
            f"{param} is not a PNG, JPEG or WebP image this server can read ({type(exc).__name__})",
            param=param,
        ) from exc
    if image.mode in ("RGB", "RGBA"):
        return image
    return image.convert("RGBA" if _has_alpha(image) else "RGB")


def mask_from_alpha(mask: Image.Image, size: tuple[int, int], *, param: str = "mask") -> Image.Image:
    """The pipelines' mask (mode L, white where they paint) from an upload whose transparent pixels are
    the ones to change; raises InvalidUpload for a mask without alpha or of a size other than ``size``."""
    if mask.size != size:
        raise InvalidUpload(
            f"{param} is {mask.size[0]}x{mask.size[1]}, the image {size[0]}x{size[1]}: they must match",
            param=param,
        )
    if mask.mode != "RGBA":
        raise InvalidUpload(
            f"{param} needs an alpha channel: its transparent pixels are the ones to change", param=param
        )
    alpha = mask.getchannel("A")
    return alpha.point(lambda value: 255 if value == 0 else 0)


def _bytes(data: str | bytes, *, param: str, max_bytes: int) -> bytes:
    if isinstance(data, bytes):
        raw = data
    else:
        text = data.strip()
        prefix = _DATA_URL.match(text)
        if prefix is not None:
            text = text[prefix.end() :]
        elif text.startswith("data:"):
            raise InvalidUpload(f"{param} is a data URL that is not base64 image data", param=param)
        # Base64 takes 4 characters for 3 bytes: a text this long cannot hold a small enough image.
        if len(text) > (max_bytes + 2) // 3 * 4 + 4:
            raise InvalidUpload(f"{param} is over {max_bytes} bytes", param=param)
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidUpload(f"{param} is not base64 (or a data URL of it)", param=param) from exc
    if len(raw) > max_bytes:
        raise InvalidUpload(f"{param} is over {max_bytes} bytes", param=param)
    if not raw:
        raise InvalidUpload(f"{param} is empty", param=param)
    return raw


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
