"""EfficientNet-Lite0: the packaged weights, the key mapping into timm, and the embedder."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo

from embeddings.efficientnet import (
    EFFICIENTNET_DEFAULT_THRESHOLD,
    EFFICIENTNET_ID,
    create_efficientnet_lite0,
    efficientnet_preprocess,
    find_weights,
    map_state_dict,
)
from embeddings.embedder import Embedder, TorchImageEmbedder, load_embedder
from embeddings.errors import ModelLoadError
from embeddings.images import decode_image

LIMIT = 50_000_000


@pytest.fixture(scope="module")
def source_weights() -> dict[str, torch.Tensor]:
    """The packaged state dict, in its original (efficientnet_pytorch) key names."""
    weights: dict[str, torch.Tensor] = torch.load(
        find_weights(), map_location="cpu", weights_only=True
    )
    return weights


@pytest.fixture(scope="module")
def timm_features() -> dict[str, torch.Tensor]:
    """The state dict timm's feature extractor expects (names and shapes)."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    return dict(model.state_dict())


def test_weights_ship_in_the_package() -> None:
    path = find_weights()
    assert path.name.startswith("efficientnet-lite0-")
    assert path.stat().st_size > 10_000_000


def test_mapping_fills_every_timm_tensor(
    source_weights: dict[str, torch.Tensor], timm_features: dict[str, torch.Tensor]
) -> None:
    mapped = map_state_dict(source_weights, timm_features)
    assert mapped.keys() == timm_features.keys()
    # All source tensors but the classifier's are used, each exactly once.
    used = {id(tensor) for tensor in mapped.values()}
    unused = [key for key, tensor in source_weights.items() if id(tensor) not in used]
    assert sorted(unused) == ["_fc.bias", "_fc.weight"]
    # Spot checks of the renaming rules: stem/head norms, a depthwise-separable and an
    # inverted-residual block (flat block 1 is timm's stage 1, index 0).
    assert mapped["bn1.running_var"] is source_weights["_bn0.running_var"]
    assert mapped["bn2.weight"] is source_weights["_bn1.weight"]
    assert mapped["blocks.0.0.conv_pw.weight"] is source_weights["_blocks.0._project_conv.weight"]
    assert mapped["blocks.1.0.conv_pw.weight"] is source_weights["_blocks.1._expand_conv.weight"]
    assert mapped["blocks.1.0.bn3.bias"] is source_weights["_blocks.1._bn2.bias"]
    assert mapped["blocks.6.0.conv_pwl.weight"] is source_weights["_blocks.15._project_conv.weight"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda sd: sd.pop("_blocks.7._bn1.running_mean"), "missing=.*blocks.3.2.bn2.running_mean"),
        (
            lambda sd: sd.update({"_blocks.16._bn0.weight": torch.ones(3)}),
            "unexpected=.*_blocks.16",
        ),
        (lambda sd: sd.update({"_extra.weight": torch.ones(3)}), "unexpected=.*_extra.weight"),
        (
            lambda sd: sd.update({"_conv_head.weight": torch.ones(1280, 320, 3, 3)}),
            r"mismatched=.*conv_head.weight: \(1280, 320, 3, 3\) vs \(1280, 320, 1, 1\)",
        ),
    ],
)
def test_mapping_fails_loudly_on_anything_it_cannot_account_for(
    source_weights: dict[str, torch.Tensor],
    timm_features: dict[str, torch.Tensor],
    damage: Callable[[dict[str, torch.Tensor]], object],
    message: str,
) -> None:
    damaged = dict(source_weights)
    damage(damaged)
    with pytest.raises(ModelLoadError, match=message):
        map_state_dict(damaged, timm_features)


def test_classifier_recognises_imagenet_classes(
    crossword: Image.Image, honeycomb: Image.Image
) -> None:
    """End to end: weights, key mapping and [-1, 1] normalisation are all right, or this fails.

    (With random or mis-mapped weights no class gets a fraction of this confidence; on real photos
    the same model says tiger cat / espresso / tripod for a cat, a coffee cup, a cameraman.)
    """
    model = create_efficientnet_lite0(num_classes=1000)
    preprocess = efficientnet_preprocess()
    with torch.inference_mode():
        probabilities = model(torch.stack([preprocess(crossword), preprocess(honeycomb)])).softmax(
            1
        )
    info = ImageNetInfo()
    top = [info.index_to_description(int(index)) for index in probabilities.argmax(1)]
    assert top == ["crossword puzzle, crossword", "honeycomb"]
    assert probabilities[0, 918] > 0.8
    assert probabilities[1, 599] > 0.5


def test_embedder_contract(
    efficientnet: TorchImageEmbedder, scene: Callable[..., Image.Image]
) -> None:
    assert isinstance(efficientnet, Embedder)
    assert efficientnet.id == EFFICIENTNET_ID == "efficientnet-lite0/imagenet"
    assert efficientnet.dim == 1280
    assert efficientnet.default_threshold == EFFICIENTNET_DEFAULT_THRESHOLD
    vectors = efficientnet.embed([scene(seed) for seed in range(3)])
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 1280)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert efficientnet.embed([]).shape == (0, 1280)


def test_batch_gives_the_same_vectors_as_one_at_a_time(
    efficientnet: TorchImageEmbedder, scene: Callable[..., Image.Image]
) -> None:
    images = [scene(seed) for seed in (10, 11, 12)]
    batched = efficientnet.embed(images)
    single = np.concatenate([efficientnet.embed([image]) for image in images])
    assert np.allclose(batched, single, atol=1e-4)


def test_reencoded_copy_scores_high_and_different_pictures_lower(
    efficientnet: TorchImageEmbedder,
    scene: Callable[..., Image.Image],
    to_bytes: Callable[..., bytes],
) -> None:
    original = to_bytes(scene(20), "PNG")
    copy = to_bytes(Image.open(io.BytesIO(original)), "JPEG", quality=85)
    other = to_bytes(scene(21), "PNG")
    vectors = efficientnet.embed(
        [decode_image(data, max_pixels=LIMIT) for data in (original, copy, other)]
    )
    same, different = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert same > 0.95
    assert different < same - 0.1
    # Not `different < default_threshold`: the threshold (0.60, calibrated on real photos) is a
    # recall gate; look-alike pictures above it are the verifier's to reject (tests/proxy).


def test_load_embedder_builds_it_and_bf16_stays_close_to_fp32(
    efficientnet: TorchImageEmbedder, scene: Callable[..., Image.Image]
) -> None:
    images = [scene(seed) for seed in (30, 31)]
    bf16 = load_embedder("efficientnet-lite0", precision="bf16")
    assert isinstance(bf16, TorchImageEmbedder)
    assert bf16.precision == "bf16"
    assert bf16.id == efficientnet.id
    cosines = (bf16.embed(images) * efficientnet.embed(images)).sum(axis=1)
    assert cosines.min() >= 0.99


def test_load_embedder_rejects_unknown_names_and_precisions() -> None:
    with pytest.raises(ValueError, match="embedder must be one of"):
        load_embedder("resnet")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_embedder("efficientnet-lite0", precision="int8")
    with pytest.raises(ValueError, match="threads"):
        load_embedder("efficientnet-lite0", threads=0)
