"""Turning untrusted image bytes into a small RGB picture, cheaply and safely.

Images arrive from clients (data URIs) or from URLs the proxy fetched, so every byte is hostile
until proven otherwise. `decode_image` accepts the formats vision-language APIs take (JPEG, PNG,
WebP, GIF), refuses anything else, and checks the pixel count from the header before a single
pixel is decoded, so a 100-kilobyte PNG that inflates to gigabytes never gets the chance.

Decoding is also the hot path of a semantic lookup, so the picture is decoded no larger than its
users need (the embedder's input side, the verifier's thumbnail area): JPEGs at a reduced DCT scale
(`Image.draft`), other formats box-reduced by an integer factor after decoding. A 900x700 JPEG
decoded at half scale for the semantic tier cost 2.9 ms instead of 4.7 ms here, and every resize
after it works on a quarter of the pixels.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Sequence
from typing import Final

import numpy as np

# Image.open(formats=...) only consults plugins that are already registered, and Pillow registers
# them lazily: importing the plugin of every accepted format (the *ImagePlugin names) registers it.
from PIL import (  # noqa: F401
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from embeddings.errors import ImageDecodeError

__all__ = ["ACCEPTED_FORMATS", "decode_image"]

logger = logging.getLogger(__name__)

# PIL format names we open. Restricting `Image.open` to these keeps PIL's less exercised parsers
# (TIFF, PSD, ...) away from untrusted bytes.
ACCEPTED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF")
# The JPEG opener reports the multi-picture JPEGs that many phone cameras write as "MPO".
_JPEG_FORMATS: Final = frozenset({"JPEG", "MPO"})
# Modes whose pixels Image.reduce() can average as they are.
_REDUCIBLE_MODES: Final = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "I", "F"})

# What a broken file can make PIL raise besides OSError: its plugins are not consistent about it.
_PIL_DECODE_ERRORS: Final = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)

# The start of an SVG or any other XML/HTML document, after optional BOM and whitespace.
_MARKUP_START: Final = (b"<?xml", b"<svg", b"<!doctype", b"<html", b"<!--")


def decode_image(
    data: bytes, *, max_pixels: int, size: int = 224, min_area: int = 0
) -> Image.Image:
    """Decode image bytes into an RGB `PIL.Image.Image` ready for an embedder.

    Accepts JPEG (including MPO), PNG, WebP and GIF (first frame only). EXIF orientation is applied,
    transparency is composited on white, and greyscale, palette, CMYK and 16-bit images are
    converted to 8-bit RGB. The result is decoded no larger than needed: JPEGs at the smallest DCT
    scale (1/8, 1/4, 1/2 or 1) that keeps the shorter side at least `size` and the area at least
    `min_area` (when the source has them); other formats are box-reduced by the largest integer
    factor that keeps both.

    Args:
        data: the image file's bytes, as received.
        max_pixels: refuse images whose width x height (read from the header, before decoding)
            exceeds this.
        size: the smallest side the caller will resize to (the embedder's input size).
        min_area: the fewest pixels the caller needs (a thumbnail of that many pixels is made
            from the picture); 0 when only `size` matters.

    Raises:
        ImageDecodeError: not an image, an unaccepted format (SVG, TIFF, ...), a corrupt or
            truncated file, or more than `max_pixels` pixels.
    """
    if max_pixels <= 0 or size <= 0 or min_area < 0:
        raise ValueError("max_pixels and size must be positive, min_area not negative")
    if _looks_like_markup(data):
        raise ImageDecodeError("SVG and other markup documents are not accepted as images")
    try:
        # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that; turn the warning into
        # an error as well. catch_warnings swaps process-global state, so a racing thread can at
        # worst leave this one category an error (harmless) or let one such warning be merely
        # printed; max_pixels, checked below, is the limit that counts either way.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, max_pixels=max_pixels, size=size, min_area=min_area)
    except ImageDecodeError:
        raise
    except _PIL_DECODE_ERRORS as exc:
        raise ImageDecodeError(_describe(exc)) from exc


def _decode(data: bytes, *, max_pixels: int, size: int, min_area: int) -> Image.Image:
    """Do the decoding; PIL's exceptions escape and are translated by `decode_image`."""
    # No `with`: the source is in memory, and closing would free the pixels we return.
    image: Image.Image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, "
            f"more than the limit of {max_pixels}"
        )
    if image.format in _JPEG_FORMATS:
        # Decode at 1/2, 1/4 or 1/8 scale in the IDCT: PIL picks the largest scale that keeps both
        # sides at least the size asked for.
        scale = _reduction(width, height, size, min_area, (8, 4, 2))
        if scale > 1:
            image.draft("RGB", (width // scale, height // scale))
    # GIF and WebP open on their first frame; load() decodes that frame only.
    image.load()
    _apply_orientation(image)
    image = _reduce(image, size, min_area)
    return _to_rgb(image)


def _apply_orientation(image: Image.Image) -> None:
    """Apply the EXIF orientation tag in place; a broken EXIF block is ignored, not fatal.

    A photo with a damaged EXIF segment is still a good picture: refusing it would only turn a
    possible cache hit into a miss.
    """
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, ValueError, SyntaxError, struct.error, KeyError, TypeError) as exc:
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)


def _reduction(width: int, height: int, size: int, min_area: int, factors: Sequence[int]) -> int:
    """The largest of ``factors`` (descending) that keeps the shorter side >= ``size`` and the
    area >= ``min_area``; 1 when none does."""
    for factor in factors:
        if min(width, height) >= size * factor and width * height >= min_area * factor * factor:
            return factor
    return 1


def _reduce(image: Image.Image, size: int, min_area: int) -> Image.Image:
    """Box-reduce by an integer factor so the shorter side stays >= size, the area >= min_area.

    The embedders' own bicubic resize then works on a small image; resizing a 4000x3000 PNG
    straight to 224 costs several times more than this reduce plus the final resize.
    """
    width, height = image.size
    factor = _reduction(width, height, size, min_area, range(min(width, height) // size, 1, -1))
    if factor < 2:
        return image
    if image.mode not in _REDUCIBLE_MODES or "transparency" in image.info:
        # Averaging palette indices or raw 16-bit/1-bit data is meaningless, and reduce() drops
        # the colour-key transparency of "L"/"RGB" PNGs: convert (and composite) first.
        image = _to_rgb(image)
    return image.reduce(factor)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, compositing transparency onto white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale PNGs: convert("L"/"RGB") clips at 255 instead of scaling.
        wide = np.asarray(image, dtype=np.int32).clip(0, 65535)
        image = Image.fromarray((wide >> 8).astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    # CMYK (Adobe's inverted CMYK JPEGs are already un-inverted by the JPEG plugin), L, 1, P, YCbCr.
    return image.convert("RGB")


def _looks_like_markup(data: bytes) -> bool:
    """Tell SVG/XML/HTML apart early, for a clearer error than "cannot identify image"."""
    head = data[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(_MARKUP_START)


def _describe(exc: BaseException) -> str:
    """A one-line reason for an ImageDecodeError, without echoing image bytes."""
    if isinstance(exc, UnidentifiedImageError):
        return f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})"
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"refused as a possible decompression bomb: {exc}"
    return f"could not decode image: {type(exc).__name__}: {exc}"
