"""CLIP through open_clip's real loading path, from a local checkpoint with random weights.

Model hubs are out of reach here, so these tests build the smallest open_clip architecture,
save its randomly initialised state dict to a file, and load that file the way an air-gapped
operator would (`--clip-pretrained /path`). Random weights say nothing about quality; they do
prove the file's weights, the image tower and open_clip's own transform are what `embed` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from embeddings.clip import CLIP_DEFAULT_THRESHOLD
from embeddings.embedder import Embedder, TorchImageEmbedder, load_embedder
from embeddings.errors import CLIP_WAYS_OUT, EmbeddingError, ModelLoadError


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_model: str, tiny_clip_checkpoint: Path) -> Embedder:
    """The CLIP embedder loaded from the local random-weight checkpoint."""
    return load_embedder(
        "clip",
        clip_model=tiny_clip_model,
        clip_pretrained=str(tiny_clip_checkpoint),
        precision="fp32",
    )


def assert_names_the_ways_out(error: ModelLoadError) -> None:
    message = str(error)
    assert CLIP_WAYS_OUT in message
    assert "network access" in message
    assert "--clip-pretrained /path/to/checkpoint" in message
    assert "--embedder efficientnet-lite0" in message


def test_local_checkpoint_loads_through_open_clip(
    tiny_clip: Embedder, tiny_clip_model: str, scene: Callable[..., Image.Image]
) -> None:
    assert isinstance(tiny_clip, TorchImageEmbedder)
    assert tiny_clip.id.startswith(f"open_clip/{tiny_clip_model}/sha256-")
    assert tiny_clip.dim == 256
    assert tiny_clip.default_threshold == CLIP_DEFAULT_THRESHOLD == 0.95
    vectors = tiny_clip.embed([scene(1), scene(2)])
    assert vectors.shape == (2, 256)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embed_matches_open_clip_encode_image_with_the_saved_weights(
    tiny_clip: Embedder,
    tiny_clip_model: str,
    tiny_clip_checkpoint: Path,
    scene: Callable[..., Image.Image],
) -> None:
    """Same numbers as open_clip's own model + transform + encode_image with that state dict."""
    import open_clip

    reference, _, preprocess = open_clip.create_model_and_transforms(tiny_clip_model)
    reference.load_state_dict(torch.load(tiny_clip_checkpoint, weights_only=True))
    reference.eval()
    images = [scene(3), scene(4)]
    with torch.inference_mode():
        expected = reference.encode_image(
            torch.stack([preprocess(i) for i in images]), normalize=True
        )
    assert np.allclose(tiny_clip.embed(images), expected.numpy(), atol=1e-5)


def test_id_names_the_weights_not_the_file_name(
    tiny_clip: Embedder, tiny_clip_model: str, tiny_clip_checkpoint: Path, tmp_path: Path
) -> None:
    import open_clip

    renamed = tmp_path / "renamed.pt"
    renamed.write_bytes(tiny_clip_checkpoint.read_bytes())
    same = load_embedder(
        "clip", clip_model=tiny_clip_model, clip_pretrained=str(renamed), precision="fp32"
    )
    assert same.id == tiny_clip.id

    torch.manual_seed(99)
    other_model, _, _ = open_clip.create_model_and_transforms(tiny_clip_model)
    other_path = tmp_path / "other.pt"
    torch.save(other_model.state_dict(), other_path)
    other = load_embedder(
        "clip", clip_model=tiny_clip_model, clip_pretrained=str(other_path), precision="fp32"
    )
    assert other.id != tiny_clip.id


def test_missing_checkpoint_names_the_ways_out(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_embedder("clip", clip_pretrained=str(tmp_path / "nowhere" / "clip.pt"))
    assert "neither a local checkpoint file nor a pretrained tag" in str(caught.value)
    assert "laion2b_s34b_b79k" in str(caught.value)  # the known tags are listed
    assert_names_the_ways_out(caught.value)


def test_corrupt_checkpoint_names_the_ways_out(tiny_clip_model: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a torch checkpoint" * 100)
    with pytest.raises(ModelLoadError) as caught:
        load_embedder("clip", clip_model=tiny_clip_model, clip_pretrained=str(broken))
    assert isinstance(caught.value, EmbeddingError)
    assert caught.value.__cause__ is not None
    assert_names_the_ways_out(caught.value)


def test_checkpoint_of_another_architecture_is_refused(
    tiny_clip_checkpoint: Path,
) -> None:
    # The tiny model's weights do not fit ViT-B-32. open_clip refuses them (with an assert in
    # its positional-embedding resize, before its strict load_state_dict even runs).
    with pytest.raises(ModelLoadError, match="could not load CLIP ViT-B-32 weights") as caught:
        load_embedder("clip", clip_model="ViT-B-32", clip_pretrained=str(tiny_clip_checkpoint))
    assert_names_the_ways_out(caught.value)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="unknown open_clip model 'ViT-Nope'") as caught:
        load_embedder("clip", clip_model="ViT-Nope")
    assert_names_the_ways_out(caught.value)
