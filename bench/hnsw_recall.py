"""HNSW search depth (efSearch) against recall and time: the numbers behind ``_HNSW_EF_SEARCH``.

Run from the repo root: ``.venv/bin/python bench/hnsw_recall.py`` (about a minute).

Two sets, each searched with the index's own HNSW settings (M 32, inner product, 1 thread) at
several efSearch values, 16 candidates per query as ``store.index`` asks for:

- real pictures: the quality set's EfficientNet-Lite0 vectors as the harness cached them
  (``python -m bench.quality.harness`` writes them), every picture in one index; each benign edit
  searches for its original. A miss counts only when an exact top-16 has the original (siblings,
  other edits of the same picture, can fill the 16 first: any of them is the same picture);
- random vectors: 30,000 unit 512-d vectors (the worst case for HNSW: no structure), each query a
  near-duplicate (cosine ~0.99) of one of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from store.index import _HNSW_EF_SEARCH, _HNSW_M, _TOP  # noqa: E402

EF_VALUES = (96, 64, 48, 32)
DEFAULT_QUALITY = Path.home() / ".cache" / "vlcache-bench" / "quality"


def hnsw(vectors: np.ndarray) -> tuple[faiss.IndexIDMap2, faiss.IndexHNSWFlat]:
    inner = faiss.IndexHNSWFlat(vectors.shape[1], _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index, inner


def sweep(vectors: np.ndarray, queries: list[tuple[np.ndarray, int, int]], label: str) -> None:
    """``queries``: (vector, expected row, row to leave out or -1)."""
    index, inner = hnsw(vectors)
    print(f"\n{label}: {len(vectors):,} vectors, {len(queries):,} queries")
    print("| efSearch | lost (exact top-16 has it) | search p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|")
    for ef in EF_VALUES:
        inner.hnsw.efSearch = ef
        lost, took = 0, []
        for vector, expected, skip in queries:
            started = time.perf_counter()
            _, ids = index.search(vector[None, :], _TOP + 1)
            took.append(time.perf_counter() - started)
            got = [i for i in ids[0].tolist() if i != skip][:_TOP]
            if expected not in got:
                sims = vectors @ vector
                if skip >= 0:
                    sims[skip] = -np.inf
                lost += expected in np.argsort(-sims)[:_TOP]
        took.sort()
        mark = " (default)" if ef == _HNSW_EF_SEARCH else ""
        p50, p99 = took[len(took) // 2], took[int(len(took) * 0.99)]
        print(f"| {ef}{mark} | {lost} | {p50 * 1000:.3f} | {p99 * 1000:.3f} |")


def real_queries(quality: Path) -> tuple[np.ndarray, list[tuple[np.ndarray, int, int]]] | None:
    cached = sorted(quality.glob("embeddings-efficientnet-lite0-fp32-*.npz"))
    if not cached:
        return None
    with np.load(cached[-1]) as data:
        paths = [key.split("|")[0] for key in data["keys"]]
        vectors = data["vectors"].astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    row = {path: i for i, path in enumerate(paths)}
    manifest = json.loads((quality / "manifest.json").read_text())
    queries = [
        (vectors[row[p["query"]]], row[p["reference"]], row[p["query"]])
        for p in manifest["pairs"]
        if p["label"] == "positive" and p["query"] in row and p["reference"] in row
    ]
    return vectors, queries


def random_queries(
    n: int, dim: int, count: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, int, int]]]:
    rng = np.random.default_rng(20251125)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = []
    for target in rng.choice(n, count, replace=False).tolist():
        noisy = vectors[target] + (0.15 / np.sqrt(dim)) * rng.standard_normal(dim).astype(
            np.float32
        )
        queries.append((noisy / np.linalg.norm(noisy), target, -1))
    return vectors, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality-dir", type=Path, default=DEFAULT_QUALITY)
    parser.add_argument("--random", type=int, default=30_000, help="random vectors")
    parser.add_argument("--queries", type=int, default=300, help="random-set queries")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    print(
        f"store.index: M {_HNSW_M}, efSearch {_HNSW_EF_SEARCH}, top {_TOP}; "
        f"faiss {faiss.__version__}"
    )
    real = real_queries(args.quality_dir)
    if real is None:
        print(
            f"\nno cached embeddings in {args.quality_dir}: run `python -m bench.quality.harness`"
        )
    else:
        sweep(*real, "real pictures (quality set, EfficientNet-Lite0)")
    sweep(*random_queries(args.random, 512, args.queries), "random unit vectors, 512-d")


if __name__ == "__main__":
    main()
