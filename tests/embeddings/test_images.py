"""decode_image: every accepted format and mode, orientation, size control, and refusals."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from embeddings.errors import EmbeddingError, ImageDecodeError
from embeddings.images import decode_image

LIMIT = 50_000_000
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)

ToBytes = Callable[..., bytes]


def colour_at(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    """The RGB pixel at (x, y), as a tuple of ints."""
    return tuple(int(v) for v in np.asarray(image)[y, x])


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> bool:
    """Colours equal within `tolerance` per channel (JPEG and WebP are lossy)."""
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but carries no image data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def half_red_half_blue(size: tuple[int, int] = (80, 40)) -> Image.Image:
    """Left half red, right half blue: shows where each side ends up after a transform."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("JPEG", {"quality": 95}), ("PNG", {}), ("WEBP", {"quality": 95}), ("GIF", {})],
)
def test_decodes_each_accepted_format_to_rgb(
    to_bytes: ToBytes, fmt: str, params: dict[str, object]
) -> None:
    image = decode_image(to_bytes(half_red_half_blue(), fmt, **params), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.size == (80, 40)
    assert close_to(colour_at(image, 10, 20), RED)
    assert close_to(colour_at(image, 70, 20), BLUE)


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK"])
def test_converts_greyscale_bilevel_palette_and_cmyk_to_rgb(to_bytes: ToBytes, mode: str) -> None:
    source = half_red_half_blue().convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = decode_image(to_bytes(source, fmt), max_pixels=LIMIT)
    assert image.mode == "RGB"
    expected = source.convert("RGB")
    for x in (10, 70):
        assert close_to(colour_at(image, x, 20), colour_at(expected, x, 20))


def test_cmyk_jpeg_keeps_its_colours(to_bytes: ToBytes) -> None:
    cyan = Image.new("CMYK", (32, 32), (255, 0, 0, 0))
    image = decode_image(to_bytes(cyan, "JPEG", quality=95), max_pixels=LIMIT)
    assert close_to(colour_at(image, 16, 16), (0, 255, 255))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(to_bytes: ToBytes) -> None:
    ramp = np.tile(np.array([0, 16384, 32768, 65535], dtype=np.uint16).repeat(8), (8, 1))
    source = Image.fromarray(ramp)
    assert source.mode == "I;16"
    image = decode_image(to_bytes(source, "PNG"), max_pixels=LIMIT)
    assert [colour_at(image, x, 4)[0] for x in (0, 8, 16, 24)] == [0, 64, 128, 255]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_transparency_is_composited_on_white(to_bytes: ToBytes, fmt: str) -> None:
    source = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    source.paste((255, 0, 0, 255), (20, 0, 40, 20))
    params: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    image = decode_image(to_bytes(source, fmt, **params), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert close_to(colour_at(image, 5, 10), WHITE)
    assert close_to(colour_at(image, 30, 10), RED)


def test_partial_alpha_blends_with_white(to_bytes: ToBytes) -> None:
    source = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    image = decode_image(to_bytes(source, "PNG"), max_pixels=LIMIT)
    assert close_to(colour_at(image, 4, 4), (255, 127, 127), tolerance=2)


def test_greyscale_with_alpha_and_palette_with_transparency(to_bytes: ToBytes) -> None:
    grey = Image.new("LA", (8, 8), (0, 0))
    assert close_to(colour_at(decode_image(to_bytes(grey, "PNG"), max_pixels=LIMIT), 1, 1), WHITE)
    palette = half_red_half_blue().convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    red_index = palette.getpixel((10, 20))
    image = decode_image(to_bytes(palette, "PNG", transparency=red_index), max_pixels=LIMIT)
    assert close_to(colour_at(image, 10, 20), WHITE)
    assert close_to(colour_at(image, 70, 20), BLUE)


def test_animated_gif_and_webp_give_the_first_frame(to_bytes: ToBytes) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, BLUE, WHITE)]
    for fmt in ("GIF", "WEBP"):
        data = to_bytes(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)
        assert Image.open(io.BytesIO(data)).n_frames == 3
        assert close_to(colour_at(decode_image(data, max_pixels=LIMIT), 8, 8), RED)


@pytest.mark.parametrize(
    ("orientation", "transpose"),
    [
        (1, None),
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ],
)
def test_exif_orientation_is_applied(
    to_bytes: ToBytes, orientation: int, transpose: Image.Transpose | None
) -> None:
    stored = half_red_half_blue()
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    image = decode_image(to_bytes(stored, "JPEG", quality=95, exif=exif), max_pixels=LIMIT)
    expected = stored if transpose is None else stored.transpose(transpose)
    assert image.size == expected.size
    width, height = expected.size
    for x, y in [(width // 4, height // 4), (3 * width // 4, 3 * height // 4)]:
        assert close_to(colour_at(image, x, y), colour_at(expected, x, y))


def test_jpeg_is_decoded_at_reduced_scale(
    to_bytes: ToBytes, scene: Callable[..., Image.Image]
) -> None:
    data = to_bytes(scene(1, size=(1800, 1400)), "JPEG", quality=90)
    image = decode_image(data, max_pixels=LIMIT)
    # DCT scaling picks the largest 1/2^k that keeps both sides >= 224: 1/4 here.
    assert image.size == (450, 350)
    large = decode_image(data, max_pixels=LIMIT, size=700)
    assert large.size == (900, 700)


def test_jpeg_scale_also_keeps_the_area_asked_for(
    to_bytes: ToBytes, scene: Callable[..., Image.Image]
) -> None:
    data = to_bytes(scene(1, size=(1800, 1400)), "JPEG", quality=90)
    # 1/4 would leave 157,500 pixels: 1/2 is the smallest scale with 200,000.
    assert decode_image(data, max_pixels=LIMIT, min_area=200_000).size == (900, 700)
    assert decode_image(data, max_pixels=LIMIT, min_area=150_000).size == (450, 350)


def test_large_png_is_reduced_but_never_below_size(
    to_bytes: ToBytes, scene: Callable[..., Image.Image]
) -> None:
    image = decode_image(to_bytes(scene(2, size=(1600, 1000)), "PNG"), max_pixels=LIMIT)
    assert 224 <= min(image.size) < 2 * 224
    assert image.size == (1600 // 4, 1000 // 4)
    small = decode_image(to_bytes(scene(2, size=(300, 200)), "PNG"), max_pixels=LIMIT)
    assert small.size == (300, 200)


def test_png_reduction_also_keeps_the_area_asked_for(
    to_bytes: ToBytes, scene: Callable[..., Image.Image]
) -> None:
    data = to_bytes(scene(2, size=(1600, 1000)), "PNG")
    # A factor of 4 leaves 100,000 pixels, 3 leaves 177,600: the area asks for 3.
    assert decode_image(data, max_pixels=LIMIT, min_area=150_000).size == (534, 334)  # ceil


def test_pixel_limit_is_checked_from_the_header(to_bytes: ToBytes) -> None:
    data = to_bytes(Image.new("1", (3000, 3000)), "PNG")
    with pytest.raises(ImageDecodeError, match="9000000 pixels, more than the limit of 1000000"):
        decode_image(data, max_pixels=1_000_000)
    # A header alone, with no pixel data behind it, is refused just the same: nothing is decoded.
    with pytest.raises(ImageDecodeError, match="more than the limit"):
        decode_image(png_header(8_000, 8_000), max_pixels=LIMIT)


@pytest.mark.parametrize(
    "side",
    [10_000, 20_000],  # above PIL's warning limit (89 Mpx), above its error limit (179 Mpx)
)
def test_pil_decompression_bomb_guard_becomes_image_decode_error(side: int) -> None:
    with pytest.raises(ImageDecodeError, match="decompression bomb") as caught:
        decode_image(png_header(side, side), max_pixels=10**10)
    assert isinstance(caught.value.__cause__, Image.DecompressionBombError | Warning)


@pytest.mark.parametrize(
    "data",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
        b'\xef\xbb\xbf\n  <?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
    ],
)
def test_svg_is_refused(data: bytes) -> None:
    with pytest.raises(ImageDecodeError, match="SVG"):
        decode_image(data, max_pixels=LIMIT)


@pytest.mark.parametrize("data", [b"", b"hello, world", b"\x00" * 64, b"GIF89a"])
def test_non_image_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data, max_pixels=LIMIT)


@pytest.mark.parametrize("fmt", ["TIFF", "BMP"])
def test_real_images_in_other_formats_are_refused(to_bytes: ToBytes, fmt: str) -> None:
    with pytest.raises(ImageDecodeError, match="accepted format"):
        decode_image(to_bytes(Image.new("RGB", (10, 10)), fmt), max_pixels=LIMIT)


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_jpeg_is_refused(
    to_bytes: ToBytes, scene: Callable[..., Image.Image], keep: float
) -> None:
    data = to_bytes(scene(3), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data[: int(len(data) * keep)], max_pixels=LIMIT)
    assert isinstance(caught.value, EmbeddingError)
    assert isinstance(caught.value.__cause__, OSError)


def test_bad_arguments_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="positive"):
        decode_image(b"", max_pixels=0)


def test_colour_key_transparency_survives_the_reduction(to_bytes: ToBytes) -> None:
    source = half_red_half_blue((1000, 500))
    image = decode_image(to_bytes(source, "PNG", transparency=RED), max_pixels=LIMIT)
    assert image.size == (500, 250)
    assert close_to(colour_at(image, 100, 100), WHITE)
    assert close_to(colour_at(image, 400, 100), BLUE)
