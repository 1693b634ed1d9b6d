"""The image-embedder interface, its torch implementation, and the factory that builds one.

An embedder turns decoded RGB pictures into unit-length float32 vectors, so that the inner product
of two vectors is their cosine similarity (what the FAISS index searches on). Its `id` names the
model *and* its weights: vectors from two ids live in different indexes and are never compared.

Everything here is synchronous and CPU-bound; the proxy calls `embed` from its own executor.
Loading happens only when `load_embedder` is called, never at import.

Runtimes: the model runs in torch, or in ONNX Runtime (`embeddings.onnx_runtime`: the same torch
model exported once to ONNX and cached on disk, equal to torch within float rounding, so both
runtimes share the embedder id). ONNX Runtime runs fp32 only. Runtime "auto" means onnx unless
bf16 is asked for explicitly (then torch), and torch when onnx fails to load (logged); precision
"auto" then means fp32. Runtime "onnx" insists: it fails with `ModelLoadError` instead, and
refuses precision "bf16". Why onnx fp32 before bf16 even where bf16 is native: fp32 vectors are
the ones the thresholds were calibrated on (bf16 moves them by up to cosine 0.99, onnx by 1e-7),
and on such a CPU (AMD EPYC with AVX512-BF16, 2 cores; bench/RESULTS.md "Semantic tier speed")
an EfficientNet-Lite0 semantic hit took p50 18.5-20 ms on onnx fp32 against 27-29 ms in torch
bf16. CLIP ViT-B-32 is the exception there: 38 ms in torch bf16 against 46 ms on onnx (p50, 2
threads; p99 52 and 51), and on an Intel Xeon with AMX 45 ms against 63 (EfficientNet-Lite0
there: 33 ms in torch bf16, 19 on onnx), so `--embed-precision bf16` is worth trying with CLIP on
such CPUs.

Precision: bf16 roughly halves the cost of a forward pass on CPUs that have native bf16 kernels
(AVX512-BF16 / AMX; measured 90 -> 38 ms for ViT-B-32 on a Zen4 core pair), but on a CPU without
them PyTorch emulates it and the same pass becomes 5-10x *slower* than fp32 (measured on an AVX2
machine: ViT-B-32 94 -> 555 ms). Hence precision "auto" in torch: bf16 where native, else fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import nn

from embeddings.errors import EmbeddingError, ModelLoadError

if TYPE_CHECKING:
    from embeddings.onnx_runtime import OnnxImageEmbedder

__all__ = [
    "EMBEDDER_NAMES",
    "PRECISIONS",
    "RUNTIMES",
    "Embedder",
    "ImageEmbedderBase",
    "TorchImageEmbedder",
    "cpu_has_native_bf16",
    "load_embedder",
    "pixel_batch",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

EMBEDDER_NAMES: Final = ("clip", "efficientnet-lite0")
PRECISIONS: Final = ("auto", "fp32", "bf16")
RUNTIMES: Final = ("auto", "onnx", "torch")

Preprocess = Callable[[Image.Image], torch.Tensor]


@runtime_checkable
class Embedder(Protocol):
    """What the rest of vlcache needs from an image embedder."""

    @property
    def id(self) -> str:
        """Identity of model + weights, e.g. "open_clip/ViT-B-32/laion2b_s34b_b79k"."""
        ...

    @property
    def dim(self) -> int:
        """Length of each embedding vector."""
        ...

    @property
    def default_threshold(self) -> float:
        """Cosine similarity at or above which two images count as the same, for this model."""
        ...

    def embed(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """Embed a batch of RGB images: float32 array of shape (len(images), dim), rows unit-norm.

        Raises:
            EmbeddingError: the model failed on this batch.
        """
        ...


class ImageEmbedderBase:
    """What both runtimes' embedders state the same way: identity, size, threshold, transform."""

    def __init__(
        self, *, id: str, dim: int, default_threshold: float, preprocess: Preprocess
    ) -> None:
        self._id = id
        self._dim = dim
        self._default_threshold = default_threshold
        self._preprocess = preprocess

    @property
    def id(self) -> str:
        """Identity of model + weights (shared by both runtimes: their vectors are the same)."""
        return self._id

    @property
    def dim(self) -> int:
        """Length of each embedding vector."""
        return self._dim

    @property
    def default_threshold(self) -> float:
        """Cosine similarity at or above which two images count as the same."""
        return self._default_threshold

    @property
    def preprocess(self) -> Preprocess:
        """The per-image transform: RGB picture -> (3, H, W) float tensor."""
        return self._preprocess

    def _empty(self) -> npt.NDArray[np.float32]:
        return np.empty((0, self._dim), dtype=np.float32)


class TorchImageEmbedder(ImageEmbedderBase):
    """An `Embedder` backed by a torch image model and its per-image preprocessing.

    The whole batch goes through the model in one forward pass under `torch.inference_mode`; the
    output is cast back to float32 before normalising, so bf16 models still return float32 rows.
    """

    def __init__(
        self,
        *,
        id: str,
        dim: int,
        default_threshold: float,
        model: nn.Module,
        preprocess: Preprocess,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Wrap `model` (moved to `dtype`, frozen, put in eval mode) and its `preprocess`."""
        super().__init__(id=id, dim=dim, default_threshold=default_threshold, preprocess=preprocess)
        self._dtype = dtype
        self._model = model.to(dtype).eval().requires_grad_(False)

    @property
    def precision(self) -> str:
        """The precision the model actually runs in: "fp32" or "bf16"."""
        return "bf16" if self._dtype == torch.bfloat16 else "fp32"

    @property
    def runtime(self) -> str:
        """What runs the model: "torch"."""
        return "torch"

    @property
    def model(self) -> nn.Module:
        """The frozen torch module (eval mode, no gradients), e.g. for an ONNX export."""
        return self._model

    def embed(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """Embed a batch of images in one forward pass; rows are L2-normalised float32."""
        if not images:
            return self._empty()
        # Denormal floats make x86 arithmetic 10-100x slower, and some pictures drive these models
        # into them: EfficientNet-Lite0 measured 23 ms one call and 560 ms the next on the same
        # photo. Flushing them to zero changes no embedding measurably. The flag is per thread
        # (MXCSR) and inherited by the OpenMP workers this thread starts, so set it before any op.
        torch.set_flush_denormal(True)
        batch = pixel_batch(self._preprocess, images)
        try:
            with torch.inference_mode():
                features = self._model(batch.to(self._dtype)).float().numpy()
        except RuntimeError as exc:
            raise EmbeddingError(f"{self._id} failed on a batch of {len(images)}: {exc}") from exc
        return unit_rows(self._id, features, len(images), self._dim)

    def __repr__(self) -> str:
        return f"<TorchImageEmbedder {self._id} dim={self._dim} {self.precision}>"


def unit_rows(
    embedder_id: str, features: npt.NDArray[Any], count: int, dim: int
) -> npt.NDArray[np.float32]:
    """A model's output checked (shape, finite values) and scaled to unit rows, as float32.

    Raises:
        EmbeddingError: wrong shape, or a NaN/inf that would poison every inner product it
            meets in the index.
    """
    if features.shape != (count, dim):
        raise EmbeddingError(
            f"{embedder_id} returned shape {tuple(features.shape)}, expected ({count}, {dim})"
        )
    if not np.isfinite(features).all():
        raise EmbeddingError(f"{embedder_id} produced non-finite features")
    return normalise(features)


def normalise(features: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length (a zero row stays zero), as float32."""
    rows = np.asarray(features, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(rows / norms, dtype=np.float32)


def pixel_batch(preprocess: Preprocess, images: Sequence[Image.Image]) -> torch.Tensor:
    """The model input of `images`: each one made RGB and preprocessed, stacked (n, 3, H, W)."""
    return torch.stack([preprocess(_as_rgb(image)) for image in images])


def _as_rgb(image: Image.Image) -> Image.Image:
    """Accept any PIL mode; `decode_image` already returns RGB, so this is normally free."""
    return image if image.mode == "RGB" else image.convert("RGB")


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has fast bf16 kernels on this CPU (AVX512 / AMX), as opposed to emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        # A private PyTorch op: if it moves, err on the side of the precision that is never slow.
        return False


def resolve_dtype(precision: str) -> torch.dtype:
    """Map a precision setting ("auto", "fp32", "bf16") to the torch dtype to run in."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    native = cpu_has_native_bf16()
    if precision == "fp32" or (precision == "auto" and not native):
        return torch.float32
    if not native:
        logger.warning(
            "precision=bf16 on a CPU without native bf16 kernels: PyTorch emulates it and "
            "embedding runs several times slower than fp32; use precision=auto or fp32"
        )
    return torch.bfloat16


def load_embedder(
    name: str,
    *,
    clip_model: str = "ViT-B-32",
    clip_pretrained: str | None = None,
    threads: int | None = None,
    precision: str = "auto",
    runtime: str = "torch",
    cache_dir: Path | None = None,
) -> Embedder:
    """Build the embedder called `name` ("clip" or "efficientnet-lite0"), ready to `embed`.

    Args:
        name: which embedder.
        clip_model: open_clip architecture name (CLIP only).
        clip_pretrained: an open_clip pretrained tag, or the path of a local checkpoint file;
            None means the default tag "laion2b_s34b_b79k", which open_clip fetches and caches.
        threads: intra-op threads of the model: torch's (process-wide, `torch.set_num_threads`)
            or ONNX Runtime's, and then torch, left with the preprocessing, gets one; None
            leaves torch's choice, which ONNX Runtime then follows.
        precision: "auto" (on torch: bf16 where the CPU has native bf16, else fp32; on onnx:
            fp32), "fp32" or "bf16".
        runtime: "auto" (onnx unless precision is "bf16" or the export fails, else torch),
            "onnx" or "torch" (the default here, so that library callers, tests and benchmarks
            run what they name; the proxy passes its `--embed-runtime`, "auto" by default).
            See the module docstring.
        cache_dir: where ONNX exports are kept; None means `~/.cache/vlcache/onnx`.

    Raises:
        ModelLoadError: the model or its weights could not be loaded; with runtime "onnx", also
            when ONNX Runtime is missing or fails, or precision "bf16" was asked for.
        ValueError: unknown `name`, `precision` or `runtime`, or `threads` < 1.
    """
    if name not in EMBEDDER_NAMES:
        raise ValueError(f"embedder must be one of {EMBEDDER_NAMES}, not {name!r}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        torch.set_num_threads(threads)
    if runtime == "onnx" and precision == "bf16":
        raise ModelLoadError(
            "runtime onnx runs fp32 only (ONNX Runtime has no fast bf16 path on CPU): "
            "use precision fp32 or auto with it, or runtime torch for bf16"
        )
    load = partial(_load, name, clip_model, clip_pretrained, precision, runtime, cache_dir)
    with ThreadPoolExecutor(1, thread_name_prefix="vlcache-load-embedder") as loader:
        # Its own thread, ended with the load: see _load.
        embedder = loader.submit(load).result()
    model_threads = torch.get_num_threads()
    if embedder.runtime == "onnx":
        # torch is left with the preprocessing alone: on one thread, so that no OpenMP team
        # spins beside ONNX Runtime's pool (EfficientNet-Lite0: 11.0 -> 9.4-9.8 ms a picture).
        torch.set_num_threads(1)
    logger.info(
        "embedder %s loaded: dim=%d runtime=%s precision=%s threads=%d",
        embedder.id,
        embedder.dim,
        embedder.runtime,
        embedder.precision,
        model_threads,
    )
    return embedder


def _load(
    name: str,
    clip_model: str,
    clip_pretrained: str | None,
    precision: str,
    runtime: str,
    cache_dir: Path | None,
) -> TorchImageEmbedder | OnnxImageEmbedder:
    """The embedder, loaded on a thread that ends when it is loaded (``load_embedder``).

    Loading runs forward passes (the weights' conversion, the ONNX export and its check), and
    torch's OpenMP runtime (libgomp) keeps a team of worker threads for every thread that ever
    ran parallel work, for as long as that thread lives. Once the teams hold more threads than
    there are CPUs, their workers sleep between parallel regions instead of spinning, and each of
    a forward pass's hundreds of small regions pays a wake-up: a model loaded on one long-lived
    thread and run on another embedded a picture in 50-52 ms instead of 31-32 (CLIP ViT-B-32,
    torch bf16, 2 cores with AMX) and 79 instead of 59-63 ms (fp32). ONNX Runtime's own pool is
    not affected (52 ms either way). The thread that embeds should be the only one with a team.
    """
    dtype = resolve_dtype(precision)
    if runtime == "torch" or (runtime == "auto" and precision == "bf16"):
        return _load_torch(name, clip_model, clip_pretrained, dtype)
    # Imported here: the torch path needs none of onnxruntime, onnx and onnxscript.
    from embeddings.onnx_runtime import default_cache_dir, load_onnx_embedder

    fp32 = _load_torch(name, clip_model, clip_pretrained, torch.float32)
    try:
        return load_onnx_embedder(
            fp32,
            cache_dir=default_cache_dir() if cache_dir is None else cache_dir,
            threads=torch.get_num_threads(),
        )
    except ModelLoadError as exc:
        if runtime == "onnx":
            raise
        logger.warning("embedding with torch instead of ONNX Runtime: %s", exc)
        if dtype == torch.float32:
            return fp32
        return _load_torch(name, clip_model, clip_pretrained, dtype)


def _load_torch(
    name: str, clip_model: str, clip_pretrained: str | None, dtype: torch.dtype
) -> TorchImageEmbedder:
    """The torch embedder called `name`, in `dtype`."""
    # Imported here, not at the top: open_clip takes seconds to import and the efficientnet
    # embedder does not need it; the two modules also import this one.
    if name == "clip":
        from embeddings.clip import load_clip

        return load_clip(model_name=clip_model, pretrained=clip_pretrained, dtype=dtype)
    from embeddings.efficientnet import load_efficientnet_lite0

    return load_efficientnet_lite0(dtype=dtype)
