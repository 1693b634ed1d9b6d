"""Real images that ship in Debian packages: fetching, choosing and de-duplicating them.

The quality benchmark needs a few hundred distinct real pictures (photos, cut-outs, charts and app
screenshots) plus groups of "same scene, different picture" for hard negatives. Debian ships them
inside documentation and data packages; ``fetch_packages`` runs ``apt-get download`` + ``dpkg -x``
into a cache directory outside the repository (nothing is committed), and ``collect_images``
walks the extracted trees, keeps what is a real picture, and drops duplicates.
"""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_PACKAGES = (
    "tuxpaint-stamps-default",
    "kphotoalbum",
    "opencv-doc",
    "labelme-examples",
    "python-sklearn-doc",
    "kicad-doc-en",
    "python3-skimage",
)
FONT_PACKAGES = ("fonts-dejavu-core", "fonts-liberation", "fonts-freefont-ttf", "fonts-noto-cjk")
PACKAGES = IMAGE_PACKAGES + FONT_PACKAGES

MIN_SIDE = 64
# Big originals are brought down to this long side: apps rarely send more, and the benchmark's
# derived images stay a few hundred MB.
MAX_SIDE = 1600
_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Candidate:
    """One image file found in a package, before de-duplication.

    ``group`` names a set of pictures of the same scene or the same class of object (burst, stereo
    pair, fruit, a photo and its annotation overlay); pictures of one group make hard negatives.
    """

    source: str
    path: Path
    group: str | None = None


@dataclass(frozen=True)
class RealImage:
    """A distinct real picture: flattened onto white, RGB, at most ``MAX_SIDE`` on its long side."""

    key: str  # sha256 of the pixels, hex
    source: str
    path: Path
    group: str | None
    image: Image.Image
    was_jpeg: bool


def fetch_packages(cache: Path) -> Path:
    """Download and unpack every package into ``cache`` (skipping what is already there)."""
    debs = cache / "debs"
    root = cache / "pkgs"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not any(debs.glob(f"{p}_*.deb"))]
    if missing:
        print(f"apt-get download {' '.join(missing)}", flush=True)
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    for package in PACKAGES:
        target = root / package
        marker = target / ".extracted"
        if marker.exists():
            continue
        (deb,) = sorted(debs.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)
        marker.touch()
    return root


def _files(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob("*") if p.suffix.lower() in _EXTENSIONS and p.is_file())


def _sample(paths: list[Path], limit: int, seed: str) -> list[Path]:
    if len(paths) <= limit:
        return paths
    return sorted(random.Random(seed).sample(paths, limit))


def _tuxpaint(root: Path) -> Iterator[Candidate]:
    top = root / "tuxpaint-stamps-default/usr/share/tuxpaint/stamps"
    by_dir: dict[Path, list[Path]] = {}
    for path in _files(top):
        if "_mirror" in path.stem or "_thumb" in path.stem:
            continue
        by_dir.setdefault(path.parent, []).append(path)
    # Coins and fruit are kept whole (the same-class hard negatives); of the other categories a few
    # stamps each, so that the cut-outs do not outnumber the photos and screenshots.
    for folder, paths in sorted(by_dir.items()):
        group = "tux:" + str(folder.relative_to(top))
        whole = "money" in group or "fruit" in group
        for path in paths if whole else _sample(paths, 3, group):
            yield Candidate("tuxpaint", path, group)


def _kphotoalbum(root: Path) -> Iterator[Candidate]:
    top = root / "kphotoalbum/usr/share/kphotoalbum/demo"
    for path in sorted(top.glob("*.jpg")):
        # donna.jpg / donna_2.jpg, grand_canyon_1..3.jpg: bursts of one scene.
        stem = re.sub(r"_\d$", "", path.stem)
        yield Candidate("kphotoalbum", path, "kpa:" + stem)


def _opencv(root: Path) -> Iterator[Candidate]:
    top = root / "opencv-doc/usr/share/doc/opencv-doc"
    for path in _files(top / "examples"):
        name = path.stem
        match = re.fullmatch(r"(left|right)(\d\d)", name)
        if match:
            group = "cv:chessboard"  # calibration shots of one board from many poses
        elif re.fullmatch(r"(left|right|aloeL|aloeR)", name):
            group = "cv:stereo-aloe" if name.startswith("aloe") else "cv:stereo-lr"
        else:
            # basketball1/2, rubberwhale1/2, graf1/3, leuvenA/B, aero1/3, pic1..6, Suzanne1/2,
            # imageTextN/R, ela_original/modified, text_defocus/motion: frames and variants.
            stem = re.sub(
                r"([_-]?(\d+|[A-Z]|original|modified|defocus|motion|in_scene))$", "", name
            )
            group = f"cv:{path.parent.name}/{stem}"
        yield Candidate("opencv-data", path, group)
    html = [p for p in _files(top / "opencv4/html") if p.suffix.lower() in (".jpg", ".jpeg")]
    for path in _sample(html, 90, "opencv-html"):
        yield Candidate("opencv-html", path, None)


def _labelme(root: Path) -> Iterator[Candidate]:
    top = root / "labelme-examples/usr/share/doc/labelme-examples/examples"
    for path in _files(top):
        if ".readme" in path.parts or path.suffix != ".jpg":
            continue
        # Video frames 00000100..104 are one scene; an annotation overlay (coloured masks and
        # labels drawn on the photo) is grouped with the photo it was drawn on.
        group = "labelme:video" if path.stem.startswith("000001") else "labelme:" + path.stem
        yield Candidate("labelme", path, group)


def _sklearn(root: Path) -> Iterator[Candidate]:
    top = root / "python-sklearn-doc/usr/share/doc/python-sklearn-doc/html/_images"
    charts = [
        p
        for p in _files(top)
        if p.name.startswith("sphx_glr_") and "_thumb" not in p.stem and "carousel" not in p.stem
    ]
    for path in _sample(charts, 90, "sklearn"):
        # sphx_glr_plot_foo_001.png, _002.png: charts of one example, same layout.
        group = "sk:" + re.sub(r"_\d{3}$", "", path.stem)
        yield Candidate("sklearn", path, group)


def _kicad(root: Path) -> Iterator[Candidate]:
    top = root / "kicad-doc-en/usr/share/doc/kicad/help/en/images"
    shots = [p for p in _files(top) if "icons" not in p.parts]
    for path in _sample(shots, 110, "kicad"):
        yield Candidate("kicad", path, None)


def _skimage(root: Path) -> Iterator[Candidate]:
    top = root / "python3-skimage/usr/lib/python3/dist-packages/skimage/data"
    for path in _files(top):
        if path.parent != top or "palette" in path.stem or "foo3x5x4" in path.stem:
            continue
        group = "ski:motorcycle" if path.stem.startswith("motorcycle") else None
        yield Candidate("skimage", path, group)


def candidates(root: Path) -> list[Candidate]:
    """Every image file the benchmark may use, in a fixed order."""
    found: list[Candidate] = []
    for walk in (_kphotoalbum, _opencv, _labelme, _skimage, _tuxpaint, _sklearn, _kicad):
        found.extend(walk(root))
    return found


def flatten(image: Image.Image) -> Image.Image:
    """RGB on white: transparent cut-outs look the way a chat client shows them."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load(candidate: Candidate) -> RealImage | None:
    """The candidate as a usable picture, or None for icons, bilevel masks and broken files."""
    try:
        with Image.open(candidate.path) as raw:
            if min(raw.size) < MIN_SIDE or raw.mode in ("1", "I", "I;16", "F"):
                return None
            was_jpeg = raw.format == "JPEG"
            image = flatten(raw)
    except OSError:
        return None
    pixels = np.asarray(image)
    # Flat images (masks, blank pages) and near-binary drawings are not pictures anyone asks about.
    if pixels.std() < 12 or len(np.unique(pixels[::4, ::4, 0])) < 8:
        return None
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    key = hashlib.sha256(np.asarray(image).tobytes()).hexdigest()
    return RealImage(key, candidate.source, candidate.path, candidate.group, image, was_jpeg)


def _signature(image: Image.Image) -> np.ndarray:
    grey = image.convert("L").resize((16, 16), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float32).ravel()


def distinct(images: list[RealImage]) -> list[RealImage]:
    """Drop exact duplicates and near-identical pictures (same aspect, nearly the same pixels).

    Packages ship one picture several times (labelme's data_annotated/ and JPEGImages/, sklearn's
    chart at two sizes); keeping both would make a positive look like a negative.
    """
    kept: list[RealImage] = []
    signatures: list[np.ndarray] = []
    aspects: list[float] = []
    seen: set[str] = set()
    for item in images:
        if item.key in seen:
            continue
        signature = _signature(item.image)
        aspect = item.image.width / item.image.height
        duplicate = any(
            abs(aspect - other_aspect) < 0.03 * aspect
            and float(np.abs(signature - other).mean()) < 4.0
            for other, other_aspect in zip(signatures, aspects, strict=True)
        )
        if duplicate:
            continue
        seen.add(item.key)
        kept.append(item)
        signatures.append(signature)
        aspects.append(aspect)
    return kept


def fonts(root: Path) -> dict[str, tuple[Path, int]]:
    """Font name -> (file, face index) for text rendering; CJK fonts are named ``Noto*CJK*``."""
    wanted = {
        "DejaVuSans": "fonts-dejavu-core/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "DejaVuSans-Bold": "fonts-dejavu-core/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
        "DejaVuSerif": "fonts-dejavu-core/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
        "DejaVuSansMono": "fonts-dejavu-core/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
        "LiberationSans": "fonts-liberation/usr/share/fonts/truetype/liberation/"
        "LiberationSans-Regular.ttf",
        "LiberationSans-Bold": "fonts-liberation/usr/share/fonts/truetype/liberation/"
        "LiberationSans-Bold.ttf",
        "LiberationSerif": "fonts-liberation/usr/share/fonts/truetype/liberation/"
        "LiberationSerif-Regular.ttf",
        "LiberationMono": "fonts-liberation/usr/share/fonts/truetype/liberation/"
        "LiberationMono-Regular.ttf",
        "LiberationSansNarrow": "fonts-liberation/usr/share/fonts/truetype/liberation/"
        "LiberationSansNarrow-Regular.ttf",
        "FreeSans": "fonts-freefont-ttf/usr/share/fonts/truetype/freefont/FreeSans.ttf",
        "FreeSerifBold": "fonts-freefont-ttf/usr/share/fonts/truetype/freefont/FreeSerifBold.ttf",
        "NotoSansCJK": "fonts-noto-cjk/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
        "NotoSansCJK-Bold": "fonts-noto-cjk/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
        "NotoSerifCJK": "fonts-noto-cjk/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
    }
    # Face 2 of the Noto CJK collections is Simplified Chinese.
    return {
        name: (root / rel, 2 if "CJK" in name else 0)
        for name, rel in wanted.items()
        if (root / rel).exists()
    }
