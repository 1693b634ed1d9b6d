"""The ONNX Runtime path: same vectors as torch, the export cache, and the runtime choice.

The real models are exported once per module (EfficientNet-Lite0 with its packaged weights, the
tiny open_clip checkpoint of test_clip.py) into a temporary cache; tests that need a cache of
their own copy that file, so only the tests about replacing a file or not writing one export again.
"""

from __future__ import annotations

import copy
import logging
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from embeddings import embedder as embedder_module
from embeddings.embedder import Embedder, TorchImageEmbedder, load_embedder
from embeddings.errors import EmbeddingError, ModelLoadError
from embeddings.images import decode_image
from embeddings.onnx_runtime import MIN_COSINE, OnnxImageEmbedder, export_key

LIMIT = 50_000_000


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export cache the module's embedders were loaded from."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def efficientnet_onnx(onnx_cache: Path) -> Embedder:
    """EfficientNet-Lite0 run by ONNX Runtime (exported into `onnx_cache`)."""
    return load_embedder(
        "efficientnet-lite0", runtime="onnx", precision="fp32", threads=1, cache_dir=onnx_cache
    )


@pytest.fixture(scope="module")
def export_file(efficientnet_onnx: Embedder, onnx_cache: Path) -> Path:
    """The cached export of EfficientNet-Lite0."""
    (path,) = onnx_cache.glob("efficientnet-lite0_imagenet-*.onnx")
    return path


@pytest.fixture(scope="module")
def photos(scene: Callable[..., Image.Image], to_bytes: Callable[..., bytes]) -> list[Image.Image]:
    """Five pictures as the proxy gets them: encoded as files, then decoded."""
    files = [
        to_bytes(scene(40), "JPEG", quality=85),
        to_bytes(scene(41, size=(900, 700)), "PNG"),
        to_bytes(scene(42, size=(300, 500)), "WEBP", quality=80),
        to_bytes(scene(43).convert("L"), "JPEG", quality=70),
        to_bytes(scene(44, size=(1024, 256)), "JPEG", quality=95),
    ]
    return [decode_image(data, max_pixels=LIMIT) for data in files]


def assert_same_vectors(onnx_rows: np.ndarray, torch_rows: np.ndarray) -> None:
    assert onnx_rows.dtype == np.float32
    assert onnx_rows.shape == torch_rows.shape
    assert np.allclose(np.linalg.norm(onnx_rows, axis=1), 1.0, atol=1e-5)
    assert (onnx_rows * torch_rows).sum(axis=1).min() >= MIN_COSINE
    assert np.abs(onnx_rows - torch_rows).max() < 1e-4


def cached_copy(export_file: Path, tmp_path: Path) -> Path:
    """A cache directory holding a copy of the module's export; returns the copy's path."""
    cached = tmp_path / "cache" / export_file.name
    cached.parent.mkdir()
    shutil.copyfile(export_file, cached)
    return cached


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_efficientnet_onnx_gives_torch_vectors_for_1_and_5_images(
    efficientnet_onnx: Embedder, efficientnet: TorchImageEmbedder, photos: list[Image.Image]
) -> None:
    assert isinstance(efficientnet_onnx, OnnxImageEmbedder)
    assert efficientnet_onnx.runtime == "onnx"
    # Same vectors, so the same id: an index built by one runtime serves the other.
    assert efficientnet_onnx.id == efficientnet.id
    assert efficientnet_onnx.dim == efficientnet.dim == 1280
    assert efficientnet_onnx.default_threshold == efficientnet.default_threshold
    assert_same_vectors(efficientnet_onnx.embed(photos[:1]), efficientnet.embed(photos[:1]))
    batch = efficientnet_onnx.embed(photos)
    assert_same_vectors(batch, efficientnet.embed(photos))
    single = np.concatenate([efficientnet_onnx.embed([photo]) for photo in photos])
    assert np.allclose(batch, single, atol=1e-5)
    assert efficientnet_onnx.embed([]).shape == (0, 1280)


def test_clip_onnx_gives_torch_vectors(
    tiny_clip_model: str,
    tiny_clip_checkpoint: Path,
    photos: list[Image.Image],
    tmp_path: Path,
) -> None:
    options: dict[str, Any] = {
        "clip_model": tiny_clip_model,
        "clip_pretrained": str(tiny_clip_checkpoint),
        "precision": "fp32",
        "threads": 2,
    }
    on_torch = load_embedder("clip", runtime="torch", **options)
    on_onnx = load_embedder("clip", runtime="onnx", cache_dir=tmp_path, **options)
    assert isinstance(on_onnx, OnnxImageEmbedder)
    assert on_onnx.id == on_torch.id
    assert on_onnx.id.startswith(f"open_clip/{tiny_clip_model}/sha256-")
    assert on_onnx.threads == 2
    assert_same_vectors(on_onnx.embed(photos[:1]), on_torch.embed(photos[:1]))
    assert_same_vectors(on_onnx.embed(photos), on_torch.embed(photos))


def test_second_load_uses_the_cache(
    efficientnet_onnx: Embedder,
    export_file: Path,
    onnx_cache: Path,
    photos: list[Image.Image],
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = export_file.stat()
    with caplog.at_level(logging.INFO, logger="embeddings.onnx_runtime"):
        again = load_embedder(
            "efficientnet-lite0", runtime="onnx", precision="fp32", cache_dir=onnx_cache
        )
    assert not any(m.startswith("exported") for m in messages(caplog))
    assert any(m.startswith("ONNX export of efficientnet-lite0") for m in messages(caplog))
    after = export_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert list(onnx_cache.iterdir()) == [export_file]  # no temporary file left behind
    assert np.array_equal(again.embed(photos[:2]), efficientnet_onnx.embed(photos[:2]))


def damage_with_garbage(path: Path) -> None:
    path.write_bytes(b"not an onnx model" * 64)


def damage_key(path: Path) -> None:
    """A valid export of the same graph, but made for another key (other weights or versions)."""
    model = onnx.load(path)
    for entry in model.metadata_props:
        if entry.key == "vlcache.export_key":
            entry.value = "0" * 64
    onnx.save(model, path)


def damage_weights(path: Path) -> None:
    """The right key, wrong numbers: a convolution's weights scaled, as bit rot or an edit would."""
    model = onnx.load(path)
    first = max(model.graph.initializer, key=lambda tensor: len(tensor.dims))
    values = numpy_helper.to_array(first) * 3.0
    first.CopyFrom(numpy_helper.from_array(values.astype(np.float32), first.name))
    onnx.save(model, path)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (damage_with_garbage, "unusable"),
        (damage_key, "made for other weights or versions"),
        (damage_weights, "disagrees with torch"),
    ],
)
def test_corrupt_or_stale_cache_file_is_replaced(
    export_file: Path,
    efficientnet: TorchImageEmbedder,
    photos: list[Image.Image],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
    problem: str,
) -> None:
    cached = cached_copy(export_file, tmp_path)
    damage(cached)
    damaged = cached.read_bytes()
    with caplog.at_level(logging.INFO, logger="embeddings.onnx_runtime"):
        embedder = load_embedder(
            "efficientnet-lite0", runtime="onnx", precision="fp32", cache_dir=cached.parent
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "exporting again" in warnings[0]
    assert problem in warnings[0]
    assert any(m.startswith("exported") for m in messages(caplog))
    assert cached.read_bytes() != damaged
    assert cached.read_bytes() == export_file.read_bytes()  # the export is deterministic
    assert_same_vectors(embedder.embed(photos[:2]), efficientnet.embed(photos[:2]))


def test_unwritable_cache_still_gives_an_onnx_embedder(
    tmp_path: Path, efficientnet: TorchImageEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("the cache directory's place is taken")
    embedder = load_embedder(
        "efficientnet-lite0", runtime="onnx", precision="fp32", cache_dir=blocked
    )
    assert isinstance(embedder, OnnxImageEmbedder)
    assert any("cannot cache the ONNX export" in m for m in messages(caplog))


def test_export_key_names_the_weights(efficientnet: TorchImageEmbedder) -> None:
    model = copy.deepcopy(efficientnet.model)
    key = export_key(efficientnet.id, model, (3, 224, 224))
    assert key == export_key(efficientnet.id, efficientnet.model, (3, 224, 224))
    assert key != export_key(efficientnet.id, model, (3, 256, 256))
    assert key != export_key("other-id", model, (3, 224, 224))
    model.state_dict()["bn2.bias"][0] += 1e-3
    assert key != export_key(efficientnet.id, model, (3, 224, 224))


@pytest.mark.parametrize("runtime", ["torch", None])
def test_runtime_torch_still_works(
    tmp_path: Path, photos: list[Image.Image], runtime: str | None
) -> None:
    """Asked for, and by default (library callers; the proxy's own default is "auto")."""
    options = {} if runtime is None else {"runtime": runtime}
    embedder = load_embedder("efficientnet-lite0", precision="fp32", cache_dir=tmp_path, **options)
    assert isinstance(embedder, TorchImageEmbedder)
    assert embedder.runtime == "torch"
    assert embedder.embed(photos[:2]).shape == (2, 1280)
    assert list(tmp_path.iterdir()) == []  # nothing exported


@pytest.mark.parametrize(
    ("precision", "runtime", "runs"),
    [("auto", "onnx", "fp32"), ("fp32", "onnx", "fp32"), ("bf16", "torch", "bf16")],
)
def test_auto_runs_onnx_unless_bf16_is_asked_for(
    export_file: Path, tmp_path: Path, precision: str, runtime: str, runs: str
) -> None:
    cache = cached_copy(export_file, tmp_path).parent
    embedder = load_embedder(
        "efficientnet-lite0", runtime="auto", precision=precision, cache_dir=cache
    )
    assert (embedder.runtime, embedder.precision) == (runtime, runs)


def test_onnx_refuses_bf16(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="runtime onnx runs fp32 only"):
        load_embedder("efficientnet-lite0", runtime="onnx", precision="bf16", cache_dir=tmp_path)


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_embedder("efficientnet-lite0", runtime="tensorrt")


def test_missing_onnxruntime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A None entry in sys.modules makes `import onnxruntime` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelLoadError) as caught:
        load_embedder("efficientnet-lite0", runtime="onnx", precision="fp32", cache_dir=tmp_path)
    message = str(caught.value)
    assert "ONNX Runtime cannot be imported" in message
    assert "pip install onnxruntime" in message
    assert "--embed-runtime torch" in message
    assert isinstance(caught.value, EmbeddingError)

    fallback = load_embedder(
        "efficientnet-lite0", runtime="auto", precision="fp32", cache_dir=tmp_path
    )
    assert isinstance(fallback, TorchImageEmbedder)
    assert any("embedding with torch instead of ONNX Runtime" in m for m in messages(caplog))


class FakeSession:
    """Stands in for an onnxruntime session: returns `output`, or raises `error`."""

    def __init__(self, output: np.ndarray | None = None, error: Exception | None = None):
        self.output, self.error = output, error

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert names == ["features"] and list(feeds) == ["pixels"]
        if self.error is not None:
            raise self.error
        assert self.output is not None
        return [self.output]


@pytest.mark.parametrize(
    ("session", "message"),
    [
        (FakeSession(np.ones((2, 8), np.float32)), r"returned shape \(2, 8\), expected \(1, 4\)"),
        (FakeSession(np.array([[1.0, np.nan, 0, 0]], np.float32)), "non-finite features"),
        (FakeSession(error=RuntimeError("out of memory")), "failed on a batch of 1"),
    ],
)
def test_bad_session_output_is_an_embedding_error(
    efficientnet: TorchImageEmbedder,
    photos: list[Image.Image],
    session: FakeSession,
    message: str,
) -> None:
    embedder = OnnxImageEmbedder(
        id="fake",
        dim=4,
        default_threshold=0.9,
        session=session,
        preprocess=efficientnet.preprocess,
        threads=1,
    )
    with pytest.raises(EmbeddingError, match=message):
        embedder.embed(photos[:1])


def test_loading_runs_on_a_thread_that_has_ended_when_it_returns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A thread that ran torch work keeps an OpenMP team while it lives, and a second team beside
    the embed thread's slows embedding (``embeddings.embedder._load``): the load's own forward
    passes run on a thread of their own, ended by the time ``load_embedder`` returns."""
    loaded_on: list[threading.Thread] = []
    load_torch = embedder_module._load_torch

    def recording(*args: Any) -> TorchImageEmbedder:
        loaded_on.append(threading.current_thread())
        return load_torch(*args)

    monkeypatch.setattr(embedder_module, "_load_torch", recording)
    load_embedder("efficientnet-lite0", runtime="torch", precision="fp32", cache_dir=tmp_path)
    (thread,) = loaded_on
    assert thread is not threading.current_thread()
    assert not thread.is_alive()


def test_onnx_leaves_torch_one_thread_for_the_preprocessing(
    export_file: Path, tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    try:
        cache = cached_copy(export_file, tmp_path).parent
        embedder = load_embedder("efficientnet-lite0", runtime="onnx", threads=2, cache_dir=cache)
        assert isinstance(embedder, OnnxImageEmbedder)
        assert embedder.threads == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
