"""ONNX Runtime as the engine of an embedder: the torch model exported once, cached, checked.

Why: ONNX Runtime runs the same fp32 graphs 2-3x faster than eager torch at batch 1 on this
project's 2-core machines: embedding one photo (preprocessing included) took 7-9 ms instead of
19-21 with EfficientNet-Lite0, 32-57 ms instead of 80-122 with CLIP ViT-B-32 (1 or 2 threads,
two runs of bench/semantic_perf.py; ~4.3 ms of each is the preprocessing, the same in both), and
a semantic hit through the proxy p50 18.5-20 ms instead of 29-35 (EfficientNet-Lite0), and 43-46
instead of 112-148 (CLIP, 2 threads). Those torch figures carry a threading penalty fixed since
(a model loaded on one thread and run on another, ``embeddings.embedder._load``); without it, on
an Intel Xeon with AMX, the hit took 19 ms on onnx against 30 in torch fp32 (EfficientNet-Lite0)
and 64 against 75 (CLIP): onnx still leads, by less.
The embedder's torch model is loaded as usual (weights, key mapping, open_clip's own checkpoint
code: nothing about loading changes), exported with `torch.onnx.export(dynamo=True)` with a
dynamic batch axis (the micro-batcher sends 1 to 16 images), written to a cache directory, and run
by ONNX Runtime's CPU provider. Preprocessing stays the torch embedder's own transform.

Embedder id: the same as torch's, because the vectors are the same. Measured on the quality set
(`bench/semantic_perf.py --equivalence all`: the 6,092 distinct pictures of
`~/.cache/vlcache-bench/quality`, decoded as the proxy decodes them, embedded by both runtimes in
batches of 16), cosine of the two unit vectors of each picture, and the largest difference of one
component:

    EfficientNet-Lite0 (packaged weights): min cosine 0.99999976, mean 1 - cosine 7.8e-9,
        max component difference 1.8e-6
    CLIP ViT-B-32 (random weights):        min cosine 0.99999982, mean 1 - cosine 9.1e-9,
        max component difference 1.9e-7

The rule was: share the id only if every picture reaches cosine 0.99999 (`MIN_COSINE`); both
embedders clear it by two orders of magnitude, the differences being float rounding of reordered
arithmetic (thresholds are 0.70 and 0.95: such a move cannot flip a decision). So an index built
by one runtime serves the other, and `--embed-runtime` can change without a cold cache. CLIP's
figures are for random weights, the only ones reachable here; every load repeats the check on the
actual weights: a probe batch goes through torch and the export, and a row below `MIN_COSINE`
refuses the export (runtime "auto" then keeps torch).

The cache: one file per export, `<cache dir>/<embedder id>-<key>.onnx`, where the key is a sha256
over the embedder id, every parameter and buffer of the loaded model (names, dtypes, shapes, bytes:
the weights themselves, whatever file or tag they came from), the input shape, the versions of
torch, onnx, onnxscript, timm and open_clip, and `_EXPORT_FORMAT`. The full key is also stored in
the file's metadata and compared on load, so a renamed or stale file is never used. Files are
written to a temporary name and renamed (atomic on POSIX), so a crash or a second process exporting
at the same moment never leaves half a file under the real name. A file that does not load, has
another key, or disagrees with torch on the probe is exported again and replaced. Exports of other
keys (older versions, other weights) are left alone; the directory can be deleted at any time.
Writing is best effort: when the directory cannot be written the export is used from memory and
made again at the next start.

Precision: fp32 only; the exported graph is fp32. `load_embedder` refuses runtime "onnx" with
precision "bf16"; its runtime "auto" gives bf16, when asked for, to torch. Where bf16 is native
(AVX512-BF16 on the machine measured), torch bf16 loses to onnx fp32 with EfficientNet-Lite0
(semantic hit p50 27-29 ms against 18.5-20) and wins with CLIP ViT-B-32 at 2 threads (p50 38 ms
against 46, p99 52 against 51); bf16 moves vectors by up to cosine 0.99, onnx by 1e-7.

Threads: ONNX Runtime's intra-op pool gets `threads` (the `--embed-threads` setting, default
torch's choice); its threads do not spin between runs (ORT's default does), because on 2 cores a
spinning thread takes the core that decodes the next request's image and verifies the last one
(measured: a 2-thread pool kept 1.1 cores busy for 0.3 cores of work when it spun).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from embeddings.embedder import (
    ImageEmbedderBase,
    Preprocess,
    TorchImageEmbedder,
    normalise,
    pixel_batch,
    unit_rows,
)
from embeddings.errors import EmbeddingError, ModelLoadError

__all__ = [
    "MIN_COSINE",
    "OnnxImageEmbedder",
    "default_cache_dir",
    "export_key",
    "load_onnx_embedder",
]

logger = logging.getLogger(__name__)

# Each row of the export must reach this cosine against torch's row for the same input, on the
# probe at every load; the quality-set figures above are what it was set from.
MIN_COSINE: Final = 0.99999
# Bump when the export code changes what it writes (names, axes, options), to retire old files.
_EXPORT_FORMAT: Final = "1"
# Packages whose code shapes the exported graph: a new version means a new export.
_VERSIONED: Final = ("torch", "onnx", "onnxscript", "timm", "open_clip_torch")
_INPUT: Final = "pixels"
_OUTPUT: Final = "features"
_KEY_PROPERTY: Final = "vlcache.export_key"
# Hex digits of the key in the file name; the whole key is in the file's metadata.
_NAME_KEY_CHARS: Final = 16
_PROBE_SEED: Final = 20251125
_PROBE_IMAGES: Final = 2
_WAYS_OUT: Final = (
    "Install it with `pip install onnxruntime onnx onnxscript`, "
    "or run the embedder in torch with --embed-runtime torch."
)


class OnnxImageEmbedder(ImageEmbedderBase):
    """An `Embedder` whose model runs in an ONNX Runtime session (fp32, CPU).

    The whole batch goes through the session in one run; rows come back L2-normalised float32,
    checked for shape and finite values as the torch embedder does.
    """

    def __init__(
        self,
        *,
        id: str,
        dim: int,
        default_threshold: float,
        session: Any,
        preprocess: Preprocess,
        threads: int,
    ) -> None:
        """Wrap an `onnxruntime.InferenceSession` of the model and the model's `preprocess`."""
        super().__init__(id=id, dim=dim, default_threshold=default_threshold, preprocess=preprocess)
        self._session = session
        self._threads = threads

    @property
    def precision(self) -> str:
        """The precision the model runs in: always "fp32"."""
        return "fp32"

    @property
    def runtime(self) -> str:
        """What runs the model: "onnx"."""
        return "onnx"

    @property
    def threads(self) -> int:
        """ONNX Runtime intra-op threads."""
        return self._threads

    def embed(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """Embed a batch of images in one session run; rows are L2-normalised float32."""
        if not images:
            return self._empty()
        batch = pixel_batch(self._preprocess, images).numpy()
        try:
            (features,) = self._session.run([_OUTPUT], {_INPUT: batch})
        except Exception as exc:
            # onnxruntime raises its own pybind exception classes (Fail, RuntimeException,
            # InvalidArgument, ...), all plain Exception subclasses: all mean "this batch failed".
            raise EmbeddingError(
                f"{self._id} (onnx) failed on a batch of {len(images)}: {exc}"
            ) from exc
        return unit_rows(f"{self._id} (onnx)", features, len(images), self._dim)

    def __repr__(self) -> str:
        return f"<OnnxImageEmbedder {self._id} dim={self._dim} fp32 threads={self._threads}>"


def default_cache_dir() -> Path:
    """Where exports are kept when the caller names no directory: ~/.cache/vlcache/onnx."""
    return Path.home() / ".cache" / "vlcache" / "onnx"


def export_key(embedder_id: str, model: torch.nn.Module, input_shape: Sequence[int]) -> str:
    """The sha256 (hex) naming one export: id, weights, input shape, exporter and model code."""
    digest = hashlib.sha256()
    parts = [_EXPORT_FORMAT, embedder_id, repr(tuple(input_shape))]
    parts += [f"{package}={_version(package)}" for package in _VERSIONED]
    for part in parts:
        digest.update(part.encode() + b"\0")
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        # Raw bytes whatever the dtype (numpy has no bf16): viewed as uint8, no copy.
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_onnx_embedder(
    embedder: TorchImageEmbedder, *, cache_dir: Path, threads: int
) -> OnnxImageEmbedder:
    """The ONNX Runtime twin of an fp32 torch `embedder`, from the cache or exported now.

    Blocking (an export takes seconds): call it from a worker thread, as `load_embedder` is.

    Raises:
        ModelLoadError: onnxruntime (or the exporter) is missing or fails, or the export does not
            agree with torch on the probe batch.
    """
    if embedder.precision != "fp32":
        raise ModelLoadError(f"ONNX export needs the fp32 model, not {embedder.precision}")
    ort = _import_runtime()
    probe = pixel_batch(embedder.preprocess, _probe_images())
    with torch.inference_mode():
        expected = embedder.model(probe).float().numpy()
    key = export_key(embedder.id, embedder.model, tuple(probe.shape[1:]))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder.id)
    path = cache_dir / f"{slug}-{key[:_NAME_KEY_CHARS]}.onnx"
    session = None
    if path.is_file():
        session, problem = _open_checked(ort, str(path), key, probe, expected, threads)
        if problem:
            logger.warning("ONNX export %s is unusable (%s): exporting again", path, problem)
        else:
            logger.info("ONNX export of %s loaded from %s", embedder.id, path)
    if session is None:
        started = time.perf_counter()
        data = _export(embedder, probe, key)
        session, problem = _open_checked(ort, data, key, probe, expected, threads)
        if session is None:
            raise ModelLoadError(f"the ONNX export of {embedder.id} is unusable: {problem}")
        _store(path, data)
        logger.info(
            "exported %s to ONNX in %.1f s (%d MB): %s",
            embedder.id,
            time.perf_counter() - started,
            len(data) // 1_000_000,
            path,
        )
    return OnnxImageEmbedder(
        id=embedder.id,
        dim=embedder.dim,
        default_threshold=embedder.default_threshold,
        session=session,
        preprocess=embedder.preprocess,
        threads=threads,
    )


def _import_runtime() -> ModuleType:
    """onnxruntime, or a `ModelLoadError` that says how to get it or do without it."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ModelLoadError(f"ONNX Runtime cannot be imported ({exc}). {_WAYS_OUT}") from exc


def _export(embedder: TorchImageEmbedder, probe: torch.Tensor, key: str) -> bytes:
    """The serialised ONNX model of `embedder`'s torch module, its key in the metadata."""
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(
            embedder.model,
            (probe,),
            input_names=[_INPUT],
            output_names=[_OUTPUT],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
        assert program is not None  # None only from the legacy exporter (dynamo=False)
        proto = program.model_proto
    except Exception as exc:
        # torch.export and onnxscript raise a wide, undocumented variety (ImportError when
        # onnxscript is missing, torch._dynamo and export errors, onnxscript conversion errors).
        raise ModelLoadError(
            f"exporting {embedder.id} to ONNX failed: {type(exc).__name__}: {exc}. {_WAYS_OUT}"
        ) from exc
    entry = proto.metadata_props.add()
    entry.key, entry.value = _KEY_PROPERTY, key
    data: bytes = proto.SerializeToString()
    return data


def _open_checked(
    ort: ModuleType,
    model: str | bytes,
    key: str,
    probe: torch.Tensor,
    expected: npt.NDArray[np.float32],
    threads: int,
) -> tuple[Any, str]:
    """(session, "") for a model file or bytes that loads, carries `key` and agrees with torch on
    the probe; (None, what is wrong) otherwise."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # As torch.set_flush_denormal in the torch embedder: denormals can slow a pass 10-100x.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        found = session.get_modelmeta().custom_metadata_map.get(_KEY_PROPERTY)
        if found != key:
            return None, f"made for other weights or versions (key {str(found)[:16]})"
        (features,) = session.run([_OUTPUT], {_INPUT: probe.numpy()})
    except Exception as exc:
        # A truncated or foreign file fails in onnxruntime's own exception classes.
        return None, f"{type(exc).__name__}: {exc}"
    if features.shape != expected.shape:
        return None, f"output shape {features.shape}, torch's {expected.shape}"
    cosines = (normalise(features) * normalise(expected)).sum(axis=1)
    if not np.isfinite(cosines).all() or cosines.min() < MIN_COSINE:
        return None, f"disagrees with torch: cosine {cosines.min():.7f} < {MIN_COSINE}"
    return session, ""


def _store(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file + rename); log and go on on failure."""
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        temporary = Path(name)
        os.fchmod(handle, 0o644)  # mkstemp makes it 0600: let other users of the cache read it
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        logger.warning(
            "cannot cache the ONNX export in %s (%s): it is made again next start", path, exc
        )
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def _probe_images() -> list[Image.Image]:
    """Deterministic photo-like pictures (smooth colour fields with grain) to compare runtimes."""
    rng = np.random.default_rng(_PROBE_SEED)
    pictures = []
    for _ in range(_PROBE_IMAGES):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((320, 240), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        pictures.append(Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8)))
    return pictures


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"
