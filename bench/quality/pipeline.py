"""What the quality benchmark's caches depend on: the code that turns a file into a vector or a
verdict. A cache made by other code is ignored, so a change to decoding, preprocessing or the
verifier can never be measured with stale vectors or verdicts."""

from __future__ import annotations

import hashlib
import inspect
from types import ModuleType

import embeddings.efficientnet
import embeddings.embedder
import embeddings.images
import embeddings.verifier
import proxy.semantic


def _digest(*modules: ModuleType) -> str:
    h = hashlib.sha256()
    for module in modules:
        h.update(inspect.getsource(module).encode())
    return h.hexdigest()[:12]


# Decoding (images.py, semantic.decode_picture), then the embedder's transform and model.
VECTORS = _digest(embeddings.images, proxy.semantic, embeddings.embedder, embeddings.efficientnet)
# Decoding, then the verifier's thumbnail and comparison.
VERDICTS = _digest(embeddings.images, proxy.semantic, embeddings.verifier)
