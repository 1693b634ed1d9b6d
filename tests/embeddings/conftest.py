"""Fixtures for the embeddings tests: generated pictures and the loaded models.

Every picture is drawn here with PIL from a fixed seed, so the tests need no files and no network.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:
    from embeddings.embedder import TorchImageEmbedder

# The smallest open_clip architecture that builds in well under a second on CPU (43 M parameters,
# 170 MB checkpoint): small enough for a test, and still the real CLIP class and loading code.
TINY_CLIP_MODEL = "ViT-S-32-alt"


def draw_scene(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A photo-like RGB scene: sky gradient, ground, a sun, a few shapes, mild noise and blur."""
    rng = np.random.default_rng(seed)
    width, height = size
    top, bottom = rng.integers(0, 256, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.5, 0.75))
    draw.rectangle((0, horizon, width, height), fill=tuple(int(v) for v in rng.integers(0, 160, 3)))
    cx, cy, r = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.4) * height, width / 12
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 220, 90))
    for _ in range(6):
        x, y = rng.uniform(0, width), rng.uniform(horizon - 80, height)
        w, h = rng.uniform(20, width / 4), rng.uniform(20, height / 3)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x, y - h, x + w, y), fill=colour)
        else:
            draw.polygon([(x, y), (x + w / 2, y - h), (x + w, y)], fill=colour)
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(
        np.int16
    )
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))


def draw_crossword(size: int = 256) -> Image.Image:
    """A black-and-white crossword grid; ImageNet class 918 "crossword puzzle"."""
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    cell = size // 12
    for i in range(12):
        for j in range(12):
            fill = "black" if rng.random() < 0.2 else "white"
            box = (i * cell, j * cell, (i + 1) * cell, (j + 1) * cell)
            draw.rectangle(box, fill=fill, outline="black")
    return image


def draw_honeycomb(size: int = 256) -> Image.Image:
    """Brown hexagon outlines on honey yellow; ImageNet class 599 "honeycomb"."""
    image = Image.new("RGB", (size, size), (240, 180, 40))
    draw = ImageDraw.Draw(image)
    radius = 14
    for row in range(-1, 12):
        for col in range(-1, 12):
            cx = col * radius * math.sqrt(3) + (row % 2) * radius * math.sqrt(3) / 2
            cy = row * radius * 1.5
            corners = [
                (
                    cx + radius * math.cos(math.pi / 6 + k * math.pi / 3),
                    cy + radius * math.sin(math.pi / 6 + k * math.pi / 3),
                )
                for k in range(6)
            ]
            draw.polygon(corners, outline=(120, 70, 0), width=3)
    return image


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """Save `image` in `fmt` to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def scene() -> Callable[..., Image.Image]:
    """`scene(seed, size=(640, 480))` draws a deterministic photo-like picture."""
    return draw_scene


@pytest.fixture(scope="session")
def to_bytes() -> Callable[..., bytes]:
    """`to_bytes(image, fmt, **save_params)` encodes a picture as a file would hold it."""
    return encode


@pytest.fixture(scope="session")
def crossword() -> Image.Image:
    """A generated crossword grid (ImageNet class 918)."""
    return draw_crossword()


@pytest.fixture(scope="session")
def honeycomb() -> Image.Image:
    """A generated honeycomb pattern (ImageNet class 599)."""
    return draw_honeycomb()


@pytest.fixture(scope="session")
def efficientnet() -> TorchImageEmbedder:
    """The real EfficientNet-Lite0 embedder (fp32, so results do not depend on the CPU)."""
    # torch, timm and open_clip are imported by the fixtures that need them, so that the
    # picture-only tests (and test_keys.py beside them) do not pay seconds of imports.
    import torch

    from embeddings.efficientnet import load_efficientnet_lite0

    return load_efficientnet_lite0(dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_clip_model() -> str:
    """The open_clip architecture name the CLIP tests use."""
    return TINY_CLIP_MODEL


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised open_clip checkpoint (state dict) saved to a local file."""
    import open_clip
    import torch

    torch.manual_seed(1234)
    model, _, _ = open_clip.create_model_and_transforms(TINY_CLIP_MODEL, pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path
