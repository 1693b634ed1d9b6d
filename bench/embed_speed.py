"""Embedding speed and bf16 fidelity on this machine: the numbers behind `precision="auto"`.

Run from the repo root: ``.venv/bin/python bench/embed_speed.py`` (1-3 minutes).

Prints, for EfficientNet-Lite0 (its real packaged weights) and open_clip ViT-B-32 (random weights:
speed does not depend on them), the median milliseconds per image of one forward pass at batch 1
and batch 16, in fp32 and in bf16 (`model.to(torch.bfloat16)`), with `--threads` torch threads.
Then the pre-processing cost of a 900x700 JPEG (full decode vs `decode_image`'s reduced-scale
decode, each followed by the CLIP transform), and the cosine between fp32 and bf16 EfficientNet
embeddings of the same pictures: real photos from `--images DIR` (default: scikit-image's bundled
sample images, if scikit-image is installed), else generated scenes (and it says so).

bf16 is fast only where the CPU has native bf16 kernels (AVX512-BF16/AMX); elsewhere PyTorch
emulates it and it is several times slower than fp32. The header line says which case this is.
``--compile`` adds torch.compile (inductor, freezing) rows for EfficientNet-Lite0: each distinct
batch size compiles separately (tens of seconds each).
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # runnable from a checkout even when not pip-installed

from embeddings.efficientnet import create_efficientnet_lite0, load_efficientnet_lite0  # noqa: E402
from embeddings.embedder import cpu_has_native_bf16  # noqa: E402
from embeddings.errors import ImageDecodeError  # noqa: E402
from embeddings.images import decode_image  # noqa: E402

MAX_PIXELS = 50_000_000
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def median_ms(run: Callable[[], object], *, per: int, budget_s: float, min_reps: int) -> float:
    """Median wall time of `run` in ms divided by `per`, after one warm-up call.

    A cell whose warm-up alone overruns the budget (emulated bf16 at batch 16 takes tens of
    seconds) is timed once more and no further, to keep the whole run within a few minutes.
    """
    t0 = time.perf_counter()
    run()
    if time.perf_counter() - t0 > budget_s:
        min_reps = 1
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - started < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000 / per


def forward_ms(model: torch.nn.Module, dtype: torch.dtype, batch: int, budget_s: float) -> float:
    """ms per image of one forward pass over a random batch of 224x224 images."""
    # Inputs in [-1, 1] like the models' real inputs; unbounded randn drives them elsewhere.
    inputs = torch.rand(batch, 3, 224, 224).mul(2).sub(1).to(dtype)

    def run() -> object:
        with torch.inference_mode():
            return model(inputs)

    return median_ms(run, per=batch, budget_s=budget_s, min_reps=3 if batch > 1 else 5)


def speed_rows(budget_s: float, with_compile: bool) -> list[tuple[str, str, float, float]]:
    """(model, variant, ms/image at batch 1, at batch 16) for both models and precisions."""
    import open_clip

    efficientnet = create_efficientnet_lite0(num_classes=0)
    clip, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    models = {"EfficientNet-Lite0": efficientnet, "ViT-B-32": clip.visual.eval()}
    rows = []
    for name, model in models.items():
        for label, dtype in (("fp32 eager", torch.float32), ("bf16 eager", torch.bfloat16)):
            typed = copy.deepcopy(model).to(dtype).eval()
            b1, b16 = (forward_ms(typed, dtype, batch, budget_s) for batch in (1, 16))
            rows.append((name, label, b1, b16))
            print(f"  {name:<18} {label:<22} b1 {b1:7.1f}  b16 {b16:7.1f}", flush=True)
    if with_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        for label, dtype in (
            ("fp32 compile+freeze", torch.float32),
            ("bf16 compile+freeze", torch.bfloat16),
        ):
            typed = copy.deepcopy(efficientnet).to(dtype).eval()
            compiled = torch.compile(typed, dynamic=False)
            t0 = time.perf_counter()
            b1, b16 = (forward_ms(compiled, dtype, batch, budget_s) for batch in (1, 16))
            rows.append(("EfficientNet-Lite0", label, b1, b16))
            print(
                f"  EfficientNet-Lite0 {label:<22} b1 {b1:7.1f}  b16 {b16:7.1f}"
                f"  (compile + timing {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return rows


def preprocess_ms(budget_s: float) -> tuple[float, float]:
    """ms for a 900x700 JPEG: (full decode + CLIP transform, decode_image + CLIP transform)."""
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    buffer = io.BytesIO()
    draw_scene(7, (900, 700)).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    full = median_ms(
        lambda: transform(Image.open(io.BytesIO(data)).convert("RGB")),
        per=1,
        budget_s=budget_s,
        min_reps=20,
    )
    drafted = median_ms(
        lambda: transform(decode_image(data, max_pixels=MAX_PIXELS)),
        per=1,
        budget_s=budget_s,
        min_reps=20,
    )
    return full, drafted


def draw_scene(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A generated photo-like scene, for when no real photos are at hand."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    top, bottom = rng.integers(0, 256, size=(2, 3))
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1))
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(20, width / 3), rng.uniform(20, height / 3)
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image.filter(ImageFilter.GaussianBlur(1))


def find_photos(directory: Path | None) -> tuple[list[Path], str]:
    """Photo files to compare fp32 and bf16 on, and where they came from."""
    if directory is None:
        try:
            import skimage.data

            directory = Path(skimage.data.__file__).parent
        except ImportError:
            return [], "generated scenes (pass --images DIR or pip install scikit-image for photos)"
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    return paths, str(directory)


def bf16_cosines(images: Sequence[Image.Image]) -> np.ndarray:
    """Cosine between fp32 and bf16 EfficientNet-Lite0 embeddings of each image."""
    fp32 = load_efficientnet_lite0(dtype=torch.float32).embed(images)
    bf16 = load_efficientnet_lite0(dtype=torch.bfloat16).embed(images)
    cosines: np.ndarray = (fp32 * bf16).sum(axis=1)
    return cosines


def main(argv: Sequence[str] | None = None) -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per timing cell")
    parser.add_argument("--images", type=Path, default=None, help="directory of photos")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # As TorchImageEmbedder.embed does: denormals alone can make a forward pass 10x slower.
    torch.set_flush_denormal(True)
    native = cpu_has_native_bf16()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"bf16 {'native' if native else 'EMULATED (no native bf16 kernels on this CPU)'}"
    )
    print("\nForward pass, median ms per image:")
    rows = speed_rows(args.budget, args.compile)
    full, drafted = preprocess_ms(args.budget)

    print("\n| model | variant | b1 ms/img | b16 ms/img |\n|---|---|---|---|")
    for name, label, b1, b16 in rows:
        print(f"| {name} | {label} | {b1:.1f} | {b16:.1f} |")
    print(
        f"\nPre-processing a 900x700 JPEG + CLIP transform: full decode {full:.1f} ms, "
        f"decode_image (reduced-scale JPEG decode) {drafted:.1f} ms"
    )

    paths, source = find_photos(args.images)
    images, names = [], []
    for path in paths:
        try:
            images.append(decode_image(path.read_bytes(), max_pixels=MAX_PIXELS))
            names.append(path.name)
        except (OSError, ImageDecodeError) as exc:
            print(f"  skipped {path.name}: {exc}")
    if not images:
        images = [draw_scene(seed) for seed in range(16)]
        names = [f"scene-{seed}" for seed in range(16)]
    cosines = bf16_cosines(images)
    worst = np.argsort(cosines)[:3]
    print(
        f"\nEfficientNet-Lite0 fp32 vs bf16 cosine on {len(images)} images from {source}: "
        f"min {cosines.min():.4f}, mean {cosines.mean():.4f}; lowest: "
        + ", ".join(f"{names[i]} {cosines[i]:.4f}" for i in worst)
    )


if __name__ == "__main__":
    main()
