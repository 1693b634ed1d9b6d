"""The open_clip image tower as an `Embedder` (the default embedder).

Weights come the way open_clip normally gets them: a pretrained *tag* (default
"laion2b_s34b_b79k" for ViT-B-32) that open_clip downloads once and caches, or, on an air-gapped
machine, a local checkpoint file passed as `pretrained=<path>`, which open_clip loads with its own
checkpoint code (state-dict unwrapping, key conversions, strict load).

Only the image tower is kept: the text tower is half of a CLIP model's memory and the cache never
embeds text.

The embedder id names the weights: the tag, or for a local file a digest of its bytes, since a
file name says nothing about what is inside. The same weights loaded by tag and from a file get
different ids, so their vectors are kept apart; that costs a cold cache, never a wrong hit.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Final

import torch

from embeddings.embedder import Preprocess, TorchImageEmbedder
from embeddings.errors import CLIP_WAYS_OUT, ModelLoadError

__all__ = [
    "CLIP_DEFAULT_THRESHOLD",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "load_clip",
]

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL: Final = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED: Final = "laion2b_s34b_b79k"
# The near-duplicate cut the seed article used with CLIP (cosine > 0.95 cut model calls by 30%+).
CLIP_DEFAULT_THRESHOLD: Final = 0.95
# Hex digits of the checkpoint's sha256 kept in the id: 64 bits, plenty to tell weights apart.
_DIGEST_CHARS: Final = 16


def load_clip(
    *,
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> TorchImageEmbedder:
    """Load an open_clip model's image tower as an embedder.

    Args:
        model_name: an open_clip architecture name (`open_clip.list_models()`).
        pretrained: a pretrained tag known to open_clip for `model_name`, or the path of a local
            checkpoint file; None means `DEFAULT_CLIP_PRETRAINED`.
        dtype: torch.float32 or torch.bfloat16.

    Raises:
        ModelLoadError: unknown architecture, unknown tag or missing file, download failure, or a
            checkpoint that does not fit the architecture. The message names the ways out.
    """
    import open_clip  # slow to import (seconds): only when CLIP is actually wanted

    if model_name not in open_clip.list_models():
        raise ModelLoadError(f"unknown open_clip model {model_name!r}. {CLIP_WAYS_OUT}")
    embedder_id, source = _resolve_weights(
        model_name, DEFAULT_CLIP_PRETRAINED if pretrained is None else pretrained
    )
    logger.info("loading CLIP %s with weights %s", model_name, source)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=source, device="cpu", precision="fp32"
        )
    except Exception as exc:
        # open_clip, huggingface_hub and torch.load raise a wide and undocumented variety here
        # (RuntimeError, OSError, pickle errors, HTTP errors, ...): all mean "no weights".
        raise ModelLoadError(
            f"could not load CLIP {model_name} weights {source!r}: "
            f"{type(exc).__name__}: {exc}. {CLIP_WAYS_OUT}"
        ) from exc
    dim = int(open_clip.get_model_config(model_name)["embed_dim"])
    visual: torch.nn.Module = model.visual
    del model  # drop the text tower
    transform: Preprocess = preprocess
    return TorchImageEmbedder(
        id=embedder_id,
        dim=dim,
        default_threshold=CLIP_DEFAULT_THRESHOLD,
        model=visual,
        preprocess=transform,
        dtype=dtype,
    )


def _resolve_weights(model_name: str, pretrained: str) -> tuple[str, str]:
    """Return (embedder id, value to pass as open_clip's `pretrained`) for a tag or a file path.

    Raises:
        ModelLoadError: `pretrained` is neither a known tag for the model nor a readable file.
    """
    import open_clip

    # A known tag wins over a file of the same name, as it does inside open_clip.
    if open_clip.is_pretrained_cfg(model_name, pretrained):
        # open_clip matches tags case- and dash-insensitively; one spelling, one id.
        tag = pretrained.lower().replace("-", "_")
        return f"open_clip/{model_name}/{tag}", tag
    path = Path(pretrained).expanduser()
    if not path.is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ModelLoadError(
            f"CLIP weights {pretrained!r} are neither a local checkpoint file nor a pretrained "
            f"tag open_clip knows for {model_name} (known tags: {tags}). {CLIP_WAYS_OUT}"
        )
    digest = _file_digest(path)[:_DIGEST_CHARS]
    return f"open_clip/{model_name}/sha256-{digest}", str(path)


def _file_digest(path: Path) -> str:
    """sha256 of a checkpoint file (about 0.5 s for ViT-B-32's 600 MB, once at start-up)."""
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        raise ModelLoadError(
            f"cannot read CLIP checkpoint {str(path)!r}: {exc}. {CLIP_WAYS_OUT}"
        ) from exc
