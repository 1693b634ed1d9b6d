"""The pixel verifier on generated pictures: benign copies pass, a changed price does not."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from embeddings import verifier
from embeddings.errors import ImageDecodeError

_DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if _DEJAVU.exists():
        return ImageFont.truetype(str(_DEJAVU), size)
    return ImageFont.load_default(size)


def product_photo(price: str, seed: int = 7) -> Image.Image:
    """A product-photo-like picture: textured background, an object, a price tag with ``price``."""
    rng = np.random.default_rng(seed)
    h, w = 480, 640
    ramp = np.linspace(0.0, 1.0, h)[:, None, None]
    top, bottom = rng.integers(40, 220, size=(2, 3))
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, w, 1))
    pixels += rng.normal(0.0, 6.0, size=(h, w, 3))  # sensor-like texture
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y = rng.uniform(60, w - 160), rng.uniform(40, h - 160)
        rx, ry = rng.uniform(30, 110), rng.uniform(30, 110)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x, y, x + rx, y + ry), fill=fill, outline=(20, 20, 20), width=3)
    draw.rectangle((400, 380, 600, 450), fill=(250, 250, 250))
    # 28 px text on a 640 px picture: the size of a price on a product photo.
    draw.text((412, 392), price, font=_font(28), fill=(200, 20, 20))
    draw.text((30, 20), "Model X-200 128GB", font=_font(20), fill=(10, 10, 10))
    return image


def _reencode(image: Image.Image, fmt: str, **options: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return Image.open(io.BytesIO(out.getvalue()))


def _crop(image: Image.Image) -> Image.Image:
    w, h = image.size
    return image.crop((round(0.03 * w), round(0.02 * h), w - round(0.04 * w), h - round(0.01 * h)))


def _border(image: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (image.width + 48, image.height + 30), (255, 255, 255))
    canvas.paste(image, (24, 15))
    return canvas


BENIGN: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg50": lambda im: _reencode(im, "JPEG", quality=50),
    "webp80": lambda im: _reencode(im, "WEBP", quality=80),
    "png": lambda im: _reencode(im, "PNG"),
    "downscale60": lambda im: im.resize((384, 288), Image.Resampling.LANCZOS),
    "crop4": _crop,
    "border": _border,
    "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.05),
    "crop+downscale+jpeg": lambda im: _reencode(
        _crop(im).resize((450, 350), Image.Resampling.BICUBIC), "JPEG", quality=70
    ),
}


@pytest.fixture(scope="module")
def stored() -> bytes:
    """The thumbnail stored with the cache entry of the original picture."""
    return verifier.make_thumbnail(product_photo("¥2999"))


@pytest.mark.parametrize("edit", sorted(BENIGN))
def test_benign_copy_passes(stored: bytes, edit: str) -> None:
    query = verifier.make_thumbnail(BENIGN[edit](product_photo("¥2999")))
    verdict = verifier.verify(query, stored)
    assert verdict.passed, verdict
    assert verdict.score < verifier.THRESHOLD


def test_identical_picture_passes(stored: bytes) -> None:
    verdict = verifier.verify(stored, stored)
    assert verdict.passed
    assert verdict.score < 1.0


@pytest.mark.parametrize("price", ["¥3999", "¥2499", "¥2998"])
def test_changed_price_digit_fails(stored: bytes, price: str) -> None:
    query = verifier.make_thumbnail(product_photo(price))
    verdict = verifier.verify(query, stored)
    assert not verdict.passed, verdict
    assert "local difference" in verdict.reason


def test_changed_price_fails_even_reencoded(stored: bytes) -> None:
    changed = _reencode(product_photo("¥3999"), "JPEG", quality=80)
    assert not verifier.verify(verifier.make_thumbnail(changed), stored).passed


def test_different_picture_fails(stored: bytes) -> None:
    other = verifier.make_thumbnail(product_photo("¥2999", seed=8))
    verdict = verifier.verify(other, stored)
    assert not verdict.passed, verdict


def test_thumbnail_is_small_and_handles_transparency() -> None:
    rgba = product_photo("¥2999").convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 255))
    thumb = verifier.make_thumbnail(rgba)
    assert len(thumb) < 60_000
    assert verifier.verify(thumb, verifier.make_thumbnail(product_photo("¥2999"))).passed


@pytest.mark.parametrize("blob", [b"", b"garbage bytes", b"VLT1\x10\x00\x10\x00not a jpeg"])
def test_garbage_raises_decode_error(stored: bytes, blob: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        verifier.verify(blob, stored)
    with pytest.raises(ImageDecodeError):
        verifier.verify(stored, blob)


def test_truncated_thumbnail_raises(stored: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        verifier.verify(stored[: len(stored) // 2], stored)


def test_a_prepared_thumbnail_can_be_kept_and_reused(stored: bytes) -> None:
    """The proxy keeps stored thumbnails prepared: comparing must never alter them."""
    kept = verifier.prepare(stored)
    before = [kept.blurred.copy(), kept.standard.copy(), kept.coarse.copy()]
    queries = [verifier.make_thumbnail(BENIGN[edit](product_photo("¥2999"))) for edit in BENIGN]
    queries.append(verifier.make_thumbnail(product_photo("¥3999")))
    first = [verifier.compare_prepared(verifier.prepare(q), kept) for q in queries]
    again = [verifier.compare_prepared(verifier.prepare(q), kept) for q in reversed(queries)]
    assert first == again[::-1]
    assert first == [verifier.compare(q, stored) for q in queries]
    for array, copy in zip((kept.blurred, kept.standard, kept.coarse), before, strict=True):
        assert np.array_equal(array, copy)
    assert [verifier.verify_prepared(verifier.prepare(q), kept).passed for q in queries] == [
        True
    ] * len(BENIGN) + [False]


def test_edges_that_disagree_everywhere_mean_another_picture_unless_moderately() -> None:
    """The decision rule's middle line: quiet edges, or edges whose disagreement is a small part
    of their contrast, are the same picture; loud disagreement is another one; the band between
    (moderate noise, still a fifth of the contrast at most) is a copy with several edits."""
    assert not verifier.differs_throughout(noise=11.9, contrast=20.0)  # quiet
    assert not verifier.differs_throughout(noise=30.0, contrast=250.0)  # 0.12 of the contrast
    assert not verifier.differs_throughout(noise=15.0, contrast=90.0)  # in the band: 0.16
    assert verifier.differs_throughout(noise=15.0, contrast=50.0)  # 0.29 of the contrast
    assert verifier.differs_throughout(noise=23.0, contrast=137.0)  # 0.17 but past the band
