"""The edits of the quality benchmark: benign ones (a cache should hit), text ones (it must not).

Benign: JPEG quality 40-95, downscale to 30-100 %, crop up to 5 % per side, PNG <-> JPEG <-> WebP,
small brightness / contrast / colour changes, a uniform border (screenshot-like), and combinations.
Text: a price tag, a spec, a word or a date rendered onto a picture, in two versions that differ
only in the text (``¥2999`` vs ``¥3999``), with the same font, size, colours, box and place:
exactly the "same product photo, another price" case the verifier exists for.

Every function takes a seeded ``random.Random`` so the whole data set is reproducible, and returns a
short kind string that names what was done (it ends up in the manifest).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

_RESAMPLERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}
# Queries smaller than this are out of scope (the issue skips icons below 64 px), so downscales of
# small cut-outs stop there.
MIN_QUERY_SIDE = 64


@dataclass(frozen=True)
class Encoded:
    """An image file's bytes, its extension, and how it was made."""

    data: bytes
    ext: str
    kind: str


def encode(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """The image as a ``png``, ``jpeg`` or ``webp`` file."""
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, "PNG", compress_level=3)
    elif fmt == "jpeg":
        image.save(out, "JPEG", quality=quality)
    elif fmt == "webp":
        image.save(out, "WEBP", quality=quality, method=3)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return out.getvalue()


def native_format(was_jpeg: bool) -> tuple[str, int]:
    """How a reference is stored: photos that came as JPEG stay JPEG (q95), the rest PNG."""
    return ("jpeg", 95) if was_jpeg else ("png", 0)


def _ext(fmt: str) -> str:
    return {"jpeg": "jpg", "png": "png", "webp": "webp"}[fmt]


# --- benign edits -------------------------------------------------------------------------------


def crop(image: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """Cut 0-5 % off each side independently (at least 1 % somewhere)."""
    w, h = image.size
    fractions = [rng.uniform(0.0, 0.05) for _ in range(4)]
    i = rng.randrange(4)
    fractions[i] = max(fractions[i], rng.uniform(0.01, 0.05))
    left, top = round(w * fractions[0]), round(h * fractions[1])
    right, bottom = w - round(w * fractions[2]), h - round(h * fractions[3])
    return image.crop((left, top, right, bottom)), f"crop{round(100 * max(fractions))}%"


def scale(image: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """Downscale to 30-100 % with one of the usual resamplers (never below 64 px)."""
    w, h = image.size
    low = max(0.3, MIN_QUERY_SIDE / min(w, h))
    factor = rng.uniform(low, 1.0) if low < 1.0 else 1.0
    name = rng.choice(sorted(_RESAMPLERS))
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return image.resize(size, _RESAMPLERS[name]), f"scale{round(100 * factor)}%-{name}"


def recolour(image: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """Brightness and contrast within +-8 %, saturation within +-15 %."""
    b, c, s = rng.uniform(0.92, 1.08), rng.uniform(0.92, 1.08), rng.uniform(0.85, 1.15)
    out = ImageEnhance.Brightness(image).enhance(b)
    out = ImageEnhance.Contrast(out).enhance(c)
    out = ImageEnhance.Color(out).enhance(s)
    pct = [round(100 * (x - 1)) for x in (b, c, s)]
    return out, f"color(b{pct[0]:+d},c{pct[1]:+d},s{pct[2]:+d})"


def border(image: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """Pad with a uniform colour: even margins, letterbox, pillarbox or uneven (screenshot-like)."""
    w, h = image.size
    mean = image.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    colours: dict[str, tuple[int, int, int]] = {
        "white": (255, 255, 255),
        "black": (0, 0, 0),
        "lightgrey": (240, 240, 240),
        "darkgrey": (32, 32, 32),
        "mean": (int(mean[0]), int(mean[1]), int(mean[2]))
        if isinstance(mean, tuple)
        else (0, 0, 0),
    }
    name = rng.choice(sorted(colours))
    layout = rng.choice(["even", "letterbox", "pillarbox", "uneven"])
    unit = max(w, h)
    if layout == "even":
        px = rng.randint(4, max(5, round(0.08 * unit)))
        sides = (px, px, px, px)
    elif layout == "letterbox":
        px = rng.randint(8, max(9, round(0.12 * unit)))
        sides = (0, px, 0, px)
    elif layout == "pillarbox":
        px = rng.randint(8, max(9, round(0.12 * unit)))
        sides = (px, 0, px, 0)
    else:
        a, b, c, d = (rng.randint(0, max(1, round(0.1 * unit))) for _ in range(4))
        sides = (a, b, c, d)
    canvas = Image.new("RGB", (w + sides[0] + sides[2], h + sides[1] + sides[3]), colours[name])
    canvas.paste(image, (sides[0], sides[1]))
    return canvas, f"border{max(sides)}px-{layout}-{name}"


def benign(image: Image.Image, family: str, rng: random.Random, native: tuple[str, int]) -> Encoded:
    """One benign variant of ``image``: one edit family, or ``combo`` (2-4 edits + encoding)."""
    steps = {"crop": crop, "scale": scale, "color": recolour, "border": border}
    kinds: list[str] = []
    out = image
    fmt, quality = native
    if family in steps:
        out, kind = steps[family](out, rng)
        kinds.append(kind)
    elif family == "jpeg":
        fmt, quality = "jpeg", rng.randint(40, 95)
    elif family == "format":
        fmt = rng.choice(["png", "webp"] if native[0] == "jpeg" else ["jpeg", "webp"])
        quality = rng.randint(75, 95)
    elif family == "combo":
        for name in rng.sample(sorted(steps), rng.randint(2, 4)):
            out, kind = steps[name](out, rng)
            kinds.append(kind)
        fmt = rng.choice(["jpeg", "jpeg", "webp", "png"])
        quality = rng.randint(40, 95) if fmt == "jpeg" else rng.randint(60, 95)
    else:
        raise ValueError(f"unknown edit family {family!r}")
    kinds.append(fmt if fmt == "png" else f"{fmt}{quality}")
    return Encoded(encode(out, fmt, quality), _ext(fmt), "+".join(kinds))


def mild(image: Image.Image, rng: random.Random, native: tuple[str, int]) -> Encoded:
    """The re-encoding a client may add on top of a text change: none, JPEG 70-95, or 70-100 %."""
    choice = rng.choice(["none", "jpeg", "scale"])
    if choice == "jpeg":
        q = rng.randint(70, 95)
        return Encoded(encode(image, "jpeg", q), "jpg", f"jpeg{q}")
    if choice == "scale":
        w, h = image.size
        factor = rng.uniform(0.7, 1.0)
        small = image.resize((round(w * factor), round(h * factor)), Image.Resampling.LANCZOS)
        return Encoded(encode(small, *native), _ext(native[0]), f"scale{round(100 * factor)}%")
    return Encoded(encode(image, *native), _ext(native[0]), "same-encoding")


# --- text edits ---------------------------------------------------------------------------------

# (category, reference text, query text): each pair differs in one or two characters or one word.
TEXT_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("price", "¥2999", "¥3999"),
    ("price", "¥2999", "¥2499"),
    ("price", "$19.99", "$18.99"),
    ("price", "$149", "$199"),
    ("price", "€1,299", "€1,199"),
    ("price", "49.90", "45.90"),
    ("price", "-20%", "-30%"),
    ("price", "SALE $25", "SALE $35"),
    ("spec", "128GB", "256GB"),
    ("spec", "8GB RAM", "6GB RAM"),
    ("spec", "500 ml", "600 ml"),
    ("spec", "Size M", "Size L"),
    ("spec", "f/2.8", "f/1.8"),
    ("word", "SALE", "SOLD"),
    ("word", "OPEN", "OVEN"),
    ("word", "IN STOCK", "NO STOCK"),
    ("word", "Model A", "Model B"),
    ("word", "approved", "rejected"),
    ("number", "2024-05-01", "2024-05-07"),
    ("number", "No. 1024", "No. 1025"),
    ("number", "Room 301", "Room 307"),
    ("number", "Tel 555-1234", "Tel 555-1284"),
    ("number", "12:30", "12:50"),
    ("cjk", "¥88", "¥66"),
    ("cjk", "2999元", "3999元"),
    ("cjk", "红色", "蓝色"),
    ("cjk", "限时特价", "限时折扣"),
    ("cjk", "库存 12 件", "库存 18 件"),
    ("cjk", "第1名", "第7名"),
    ("cjk", "售价 ¥1299", "售价 ¥1399"),
)

_PLACES = {
    "top-left": (0.0, 0.0),
    "top": (0.5, 0.0),
    "top-right": (1.0, 0.0),
    "left": (0.0, 0.5),
    "centre": (0.5, 0.5),
    "right": (1.0, 0.5),
    "bottom-left": (0.0, 1.0),
    "bottom": (0.5, 1.0),
    "bottom-right": (1.0, 1.0),
}
_INKS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "red": (220, 30, 30),
    "yellow": (250, 220, 40),
    "blue": (20, 60, 200),
}


@dataclass(frozen=True)
class TextEdit:
    """The two versions of one picture with text on it, and what tells them apart."""

    reference: Image.Image
    query: Image.Image
    kind: str


def _contrasting(rgb: tuple[float, ...]) -> str:
    return "black" if _luma(rgb) > 128 else "white"


def _luma(rgb: tuple[float, ...]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _legible(edit: TextEdit) -> bool:
    """Whether the change shows in brightness, not just in hue.

    Text hidden behind same-coloured strokes, or blue on dark grey, changes the pixels without a
    visible change of brightness; such a pair says nothing about a verifier (a luma one is blind
    to it, and a reader barely sees it), so it is drawn again.
    """
    a = np.asarray(edit.reference.convert("L"), dtype=np.int16)
    b = np.asarray(edit.query.convert("L"), dtype=np.int16)
    changed = np.asarray(edit.reference) != np.asarray(edit.query)
    any_change = int(changed.any(axis=2).sum())
    visible = int((np.abs(a - b) > 40).sum())
    return visible >= 8 and visible >= 0.4 * any_change


def render_text_pair(
    image: Image.Image, rng: random.Random, fonts: dict[str, tuple[Path, int]]
) -> TextEdit:
    """Render a legible text pair onto ``image`` (random text, font, size, place and style)."""
    for _ in range(12):
        edit = _render_text_pair(image, rng, fonts)
        if _legible(edit):
            return edit
    return _render_text_pair(image, rng, fonts, style="tag")


def _render_text_pair(
    image: Image.Image,
    rng: random.Random,
    fonts: dict[str, tuple[Path, int]],
    style: str | None = None,
) -> TextEdit:
    category, text_a, text_b = rng.choice(TEXT_PAIRS)
    non_ascii = any(ord(ch) > 0x24FF for ch in text_a + text_b)  # CJK needs a CJK font
    names = sorted(n for n in fonts if ("CJK" in n) or not non_ascii)
    font_name = rng.choice(names)
    path, index = fonts[font_name]
    w, h = image.size
    short = min(w, h)
    # Text from legible-small (2.5 % of the short side, never under 12 px) to headline size.
    low = max(12.0, 0.025 * short)
    size = round(rng.uniform(low, max(low + 4.0, 0.09 * short)))
    font = ImageFont.truetype(str(path), size, index=index)
    style = style or rng.choice(["tag", "tag", "plain", "outline", "banner"])
    place = rng.choice(sorted(_PLACES))
    draft = ImageDraw.Draw(image)
    boxes = [draft.textbbox((0, 0), t, font=font) for t in (text_a, text_b)]
    text_w = max(b[2] - b[0] for b in boxes)
    text_h = max(b[3] for b in boxes) - min(b[1] for b in boxes)
    pad = max(2, round(0.3 * size))
    margin = round(0.03 * short)
    box_w, box_h = text_w + 2 * pad, text_h + 2 * pad
    if style == "banner":
        box_w = w
    fx, fy = _PLACES[place]
    x0 = round(margin + fx * max(0, w - box_w - 2 * margin)) if style != "banner" else 0
    y0 = round(margin + fy * max(0, h - box_h - 2 * margin))
    region = image.crop((x0, y0, min(w, x0 + box_w), min(h, y0 + box_h)))
    mean = region.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))
    mean_rgb = mean if isinstance(mean, tuple) else (0, 0, 0)
    if style in ("tag", "banner"):
        fill_name = rng.choice(["white", "yellow", "red", "black"])
        ink_name = _contrasting(_INKS[fill_name])
        if fill_name == "red":
            ink_name = rng.choice(["white", "yellow"])
    else:
        fill_name = ""
        ink_name = _contrasting(mean_rgb)
        coloured = [
            n for n in ("red", "yellow", "blue") if abs(_luma(_INKS[n]) - _luma(mean_rgb)) > 80
        ]
        if coloured and rng.random() < 0.3:
            ink_name = rng.choice(coloured)
    versions = []
    for text in (text_a, text_b):
        out = image.copy()
        draw = ImageDraw.Draw(out)
        if fill_name:
            draw.rectangle((x0, y0, x0 + box_w - 1, y0 + box_h - 1), fill=_INKS[fill_name])
        tx = x0 + pad if style != "banner" else x0 + margin + pad
        ty = y0 + pad - min(b[1] for b in boxes)
        stroke = {}
        if style == "outline":
            stroke = {
                "stroke_width": max(1, size // 12),
                "stroke_fill": _INKS[_contrasting(_INKS[ink_name])],
            }
        draw.text((tx, ty), text, font=font, fill=_INKS[ink_name], **stroke)  # type: ignore[arg-type]
        versions.append(out)
    kind = f"{category} {text_a}->{text_b} {font_name} {size}px {place} {style}"
    return TextEdit(versions[0], versions[1], kind)
