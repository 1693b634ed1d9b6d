"""VectorIndex: restricted search with real FAISS, tiers, removal and snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store.index import FLAT_FAISS_ROWS, VectorIndex

DIM = 64


def unit(rng: np.random.Generator, n: int, k: int = 1) -> np.ndarray:
    v = rng.standard_normal((n, k, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=2, keepdims=True)


def near(v: np.ndarray, rng: np.random.Generator, noise: float = 0.02) -> np.ndarray:
    w = v + noise * rng.standard_normal(v.shape).astype(np.float32)
    return w / np.linalg.norm(w, axis=-1, keepdims=True)


@pytest.mark.parametrize("size", [8, FLAT_FAISS_ROWS + 10, 700])
def test_search_finds_the_near_duplicate_within_its_group_only(size: int) -> None:
    rng = np.random.default_rng(size)
    index = VectorIndex("test/emb", DIM, approx_rows=600)
    vectors = unit(rng, size)
    for i, v in enumerate(vectors):
        index.add(1000 + i, ("tenant-a", "q1"), v)
    index.add(1, ("tenant-b", "q1"), vectors[5])  # another tenant, the same picture
    index.add(2, ("tenant-a", "q2"), vectors[5])  # another question, the same picture

    found = index.search(("tenant-a", "q1"), near(vectors[5], rng), threshold=0.9)
    assert found and found[0].entry_id == 1005
    assert all(c.entry_id >= 1000 for c in found)
    assert found[0].similarity > 0.95
    assert index.search(("tenant-a", "q1"), unit(rng, 1)[0], threshold=0.9) == []
    assert index.search(("tenant-c", "q1"), vectors[5], threshold=0.5) == []


def test_multi_image_entries_match_position_by_position() -> None:
    rng = np.random.default_rng(1)
    index = VectorIndex("test/emb", DIM)
    a, b = unit(rng, 1, 2)[0], unit(rng, 1, 2)[0]
    index.add(1, ("t", "q"), a)
    index.add(2, ("t", "q"), b)
    (hit,) = index.search(("t", "q"), near(a, rng), threshold=0.9)
    assert hit.entry_id == 1 and len(hit.per_image) == 2
    swapped = np.stack([a[1], a[0]])
    assert index.search(("t", "q"), swapped, threshold=0.9) == []
    mixed = np.stack([a[0], b[1]])  # first image of one entry, second of the other
    assert index.search(("t", "q"), mixed, threshold=0.9) == []
    assert index.search(("t", "q"), a[:1], threshold=0.5) == []  # other image count
    assert index.has_group(("t", "q"), 2) and not index.has_group(("t", "q"), 1)


@pytest.mark.parametrize("size", [8, FLAT_FAISS_ROWS + 10, 700])
def test_multi_image_similarities_are_exact_in_every_tier(size: int) -> None:
    rng = np.random.default_rng(size)
    index = VectorIndex("test/emb", DIM, approx_rows=600)
    entries = unit(rng, size, 2)
    for i, v in enumerate(entries):
        index.add(1000 + i, ("t", "q"), v)
    query = near(entries[7], rng)
    found = index.search(("t", "q"), query, threshold=0.9)
    assert found and found[0].entry_id == 1007
    # The stored float32 vectors, whatever tier answered: the same figures as a plain product.
    expected = np.einsum("kd,kd->k", entries[7], query)
    assert found[0].per_image == tuple(float(x) for x in expected)
    assert found[0].similarity == float(expected.min())


@pytest.mark.parametrize("size", [5, FLAT_FAISS_ROWS + 5, 650])
def test_removal_in_every_tier(size: int) -> None:
    rng = np.random.default_rng(2)
    index = VectorIndex("test/emb", DIM, approx_rows=600)
    vectors = unit(rng, size)
    for i, v in enumerate(vectors):
        index.add(i + 1, ("t", "q"), v)
    assert index.remove(3) and not index.remove(3)
    assert 3 not in index and len(index) == size - 1
    assert all(c.entry_id != 3 for c in index.search(("t", "q"), vectors[2], threshold=0.5))
    (hit,) = index.search(("t", "q"), vectors[4], threshold=0.99)
    assert hit.entry_id == 5


def test_snapshot_round_trip_keeps_every_vector_and_tier(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    index = VectorIndex("test/emb", DIM, approx_rows=300)
    big = unit(rng, 320)
    for i, v in enumerate(big):
        index.add(i + 1, ("shared:shop", "q\twith\ttabs"), v)
    pair = unit(rng, 1, 2)[0]
    index.add(9999, ("key:abc", "q2"), pair)
    path = tmp_path / "index.npz"
    index.save(path, watermark=1234.5)

    loaded, watermark = VectorIndex.load(path, "test/emb", DIM, approx_rows=300)
    assert watermark == 1234.5 and len(loaded) == len(index)
    (hit,) = loaded.search(("shared:shop", "q\twith\ttabs"), big[17], threshold=0.99)
    assert hit.entry_id == 18
    assert loaded.search(("key:abc", "q2"), pair, threshold=0.99)[0].entry_id == 9999

    other, mark = VectorIndex.load(path, "other/emb", DIM, approx_rows=300)
    assert len(other) == 0 and mark == 0.0
    path.write_bytes(b"not a snapshot")
    broken, mark = VectorIndex.load(path, "test/emb", DIM, approx_rows=300)
    assert len(broken) == 0 and mark == 0.0
