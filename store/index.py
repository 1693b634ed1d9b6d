"""``VectorIndex``: image vectors of one embedder, searchable only within a question group.

A semantic lookup may only ever consider entries of the same namespace (tenant) and the same
question fingerprint, so vectors are partitioned by that pair, the *group*. A search never
touches another tenant's vectors, and its cost depends on the size of its own group, not on the
size of the whole cache. Inside a group:

- every entry has the same number of images ``k`` (the fingerprint fixes the image positions), so
  its vectors form an ``(n, k, d)`` float32 array: the group's truth, kept for snapshots;
- small groups are searched exactly with one matrix product;
- from ``FLAT_FAISS_ROWS`` entries on, a FAISS ``IndexFlatIP`` per image position does the exact
  search (BLAS, several times faster than numpy's matrix-vector product here);
- from ``approx_rows`` entries on, a FAISS HNSW index per position replaces it (approximate; the
  top candidates of every position are re-scored exactly).

Vectors are L2-normalised, so inner product is cosine similarity. Not thread-safe: the store runs
every call on one dedicated thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import numpy.typing as npt
import orjson

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
Group = tuple[str, str]  # namespace, fingerprint

FLAT_FAISS_ROWS = 256
_HNSW_M = 32
_HNSW_EF_SEARCH = 96
_TOP = 16
_SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Candidate:
    """An entry whose every image is similar to the query's image at the same position."""

    entry_id: int
    similarity: float  # the minimum over image positions
    per_image: tuple[float, ...]


class _GroupVectors:
    """The vectors of one group, with FAISS accelerators once it is large."""

    __slots__ = ("approx", "dim", "ids", "images", "indexes", "n", "vectors")

    def __init__(self, images: int, dim: int) -> None:
        self.images = images
        self.dim = dim
        self.n = 0
        self.ids = np.empty(1, dtype=np.int64)
        self.vectors: Vectors = np.empty((1, images, dim), dtype=np.float32)
        self.indexes: list[Any] | None = None
        self.approx = False

    def add(self, entry_id: int, vectors: Vectors, approx_rows: int) -> None:
        if self.n == len(self.ids):
            grow = max(self.n * 2, 1)
            self.ids = np.resize(self.ids, grow)
            bigger = np.empty((grow, self.images, self.dim), dtype=np.float32)
            bigger[: self.n] = self.vectors[: self.n]
            self.vectors = bigger
        self.ids[self.n] = entry_id
        self.vectors[self.n] = vectors
        self.n += 1
        if self.indexes is not None:
            for position, index in enumerate(self.indexes):
                index.add_with_ids(vectors[position][None, :], np.array([entry_id]))
        self._tier(approx_rows)

    def remove(self, entry_id: int, approx_rows: int) -> bool:
        where = np.nonzero(self.ids[: self.n] == entry_id)[0]
        if len(where) == 0:
            return False
        last = self.n - 1
        row = int(where[0])
        self.ids[row] = self.ids[last]
        self.vectors[row] = self.vectors[last]
        self.n = last
        if self.indexes is not None:
            if self.approx:
                self.indexes = None  # HNSW cannot delete: rebuilt from the arrays below
            else:
                for index in self.indexes:
                    index.remove_ids(np.array([entry_id], dtype=np.int64))
        self._tier(approx_rows)
        return True

    def _tier(self, approx_rows: int) -> None:
        want_faiss = self.n >= FLAT_FAISS_ROWS
        want_approx = self.n >= approx_rows
        if not want_faiss:
            self.indexes = None
            self.approx = False
            return
        if self.indexes is not None and self.approx == want_approx:
            return
        self.indexes = [self._build(position, want_approx) for position in range(self.images)]
        self.approx = want_approx

    def _build(self, position: int, approx: bool) -> Any:
        if approx:
            inner: Any = faiss.IndexHNSWFlat(self.dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = _HNSW_EF_SEARCH
        else:
            inner = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIDMap2(inner)
        data = np.ascontiguousarray(self.vectors[: self.n, position])
        index.add_with_ids(data, self.ids[: self.n].copy())
        return index

    def search(self, query: Vectors, threshold: float) -> list[Candidate]:
        if self.indexes is None:
            sims = np.einsum("nkd,kd->nk", self.vectors[: self.n], query)
            return _candidates(self.ids[: self.n], sims, threshold)
        top = min(self.n, _TOP if self.images == 1 or self.approx else self.n)
        found: set[int] | None = None
        for position, index in enumerate(self.indexes):
            _, ids = index.search(query[position][None, :], top)
            hits = {int(i) for i in ids[0] if i >= 0}
            found = hits if found is None else found & hits
        if not found:
            return []
        # The found entries' vectors straight from the indexes (IndexIDMap2 maps id -> row):
        # finding their rows in ``ids`` was an O(n) scan, ~0.1 ms at 30,000 entries.
        ids = np.fromiter(found, dtype=np.int64, count=len(found))
        stored = np.stack([index.reconstruct_batch(ids) for index in self.indexes], axis=1)
        sims = np.einsum("nkd,kd->nk", stored, query)
        return _candidates(ids, sims, threshold)


def _candidates(ids: npt.NDArray[np.int64], sims: Vectors, threshold: float) -> list[Candidate]:
    worst = sims.min(axis=1)
    keep = np.nonzero(worst >= threshold)[0]
    order = keep[np.argsort(-worst[keep])]
    return [
        Candidate(int(ids[i]), float(worst[i]), tuple(float(s) for s in sims[i])) for i in order
    ]


class VectorIndex:
    """All vectors of one embedder, partitioned by group (namespace, fingerprint)."""

    def __init__(self, embedder: str, dim: int, *, approx_rows: int = 8192) -> None:
        self.embedder = embedder
        self.dim = dim
        self.approx_rows = approx_rows
        self._groups: dict[Group, _GroupVectors] = {}
        self._where: dict[int, Group] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._where

    def has_group(self, group: Group, images: int) -> bool:
        """True when ``group`` holds entries with ``images`` images (a search could hit)."""
        vectors = self._groups.get(group)
        return vectors is not None and vectors.images == images and vectors.n > 0

    def add(self, entry_id: int, group: Group, vectors: Vectors) -> None:
        """Index ``vectors`` (shape ``(k, dim)``, normalised) of entry ``entry_id``."""
        if entry_id in self._where:
            return
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        target = self._groups.get(group)
        if target is None or target.images != len(vectors):
            if target is not None and target.n:
                log.warning("group image count changed; dropping %d stale vectors", target.n)
                for stale in target.ids[: target.n]:
                    self._where.pop(int(stale), None)
            target = self._groups[group] = _GroupVectors(len(vectors), self.dim)
        target.add(entry_id, vectors, self.approx_rows)
        self._where[entry_id] = group

    def remove(self, entry_id: int) -> bool:
        """Forget ``entry_id``; False when it was not indexed."""
        group = self._where.pop(entry_id, None)
        if group is None:
            return False
        target = self._groups[group]
        target.remove(entry_id, self.approx_rows)
        if target.n == 0:
            del self._groups[group]
        return True

    def search(self, group: Group, query: Vectors, threshold: float) -> list[Candidate]:
        """Entries of ``group`` whose every image reaches ``threshold``, best first."""
        target = self._groups.get(group)
        query = np.asarray(query, dtype=np.float32).reshape(-1, self.dim)
        if target is None or target.images != len(query):
            return []
        return target.search(query, threshold)

    def save(self, path: Path, watermark: float) -> None:
        """Write a snapshot (atomically) that knows SQL up to ``watermark`` (a created_at).

        One ``.npz`` (no pickle): per image count, the groups' entry ids and vectors end to end
        with their boundaries, the group names as one text blob, and the serialised HNSW
        indexes of approximate groups (rebuilding those at start-up would take minutes).
        """
        arrays: dict[str, npt.NDArray[Any]] = {}
        names: list[tuple[int, str, str]] = []
        by_images: dict[int, list[tuple[Group, _GroupVectors]]] = {}
        for group, target in self._groups.items():
            by_images.setdefault(target.images, []).append((group, target))
        for images, members in by_images.items():
            arrays[f"ids_{images}"] = np.concatenate([t.ids[: t.n] for _, t in members])
            arrays[f"vectors_{images}"] = np.concatenate([t.vectors[: t.n] for _, t in members])
            arrays[f"sizes_{images}"] = np.array([t.n for _, t in members], dtype=np.int64)
            names.extend((images, ns, fp) for (ns, fp), _ in members)
            for number, (_, target) in enumerate(members):
                if target.approx and target.indexes is not None:
                    for position, faiss_index in enumerate(target.indexes):
                        key = f"hnsw_{images}_{number}_{position}"
                        arrays[key] = faiss.serialize_index(faiss_index)
        arrays["names"] = np.frombuffer(orjson.dumps(names), dtype=np.uint8)
        arrays["meta"] = np.frombuffer(
            f"{_SNAPSHOT_VERSION}\t{self.embedder}\t{self.dim}\t{watermark!r}".encode(),
            dtype=np.uint8,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as out:
            np.savez(out, **cast(dict[str, Any], arrays))
        partial.replace(path)

    @classmethod
    def load(
        cls, path: Path, embedder: str, dim: int, *, approx_rows: int
    ) -> tuple[VectorIndex, float]:
        """A snapshot's index and watermark; an empty index (watermark 0) if none is usable."""
        index = cls(embedder, dim, approx_rows=approx_rows)
        if not path.exists():
            return index, 0.0
        try:
            with np.load(path, allow_pickle=False) as data:
                version, saved_embedder, saved_dim, watermark = (
                    data["meta"].tobytes().decode().split("\t")
                )
                if (int(version), saved_embedder, int(saved_dim)) != (
                    _SNAPSHOT_VERSION,
                    embedder,
                    dim,
                ):
                    log.warning("index snapshot %s is for another embedder: rebuilding", path)
                    return index, 0.0
                index._restore(data)
        except (OSError, ValueError, KeyError, orjson.JSONDecodeError) as exc:
            log.warning("index snapshot %s unreadable (%s): rebuilding from SQL", path, exc)
            return cls(embedder, dim, approx_rows=approx_rows), 0.0
        return index, float(watermark)

    def _restore(self, data: Any) -> None:
        # An NpzFile re-reads a member from the zip on every access: read each one once.
        arrays = {name: data[name] for name in data.files}
        cursor: dict[int, tuple[int, int]] = {}  # images -> (next group number, next row)
        for images, namespace, fingerprint in orjson.loads(arrays["names"].tobytes()):
            number, row = cursor.get(images, (0, 0))
            size = int(arrays[f"sizes_{images}"][number])
            target = _GroupVectors(images, self.dim)
            # Views into the loaded arrays (disjoint per group); a group that grows reallocates.
            target.ids = arrays[f"ids_{images}"][row : row + size]
            target.vectors = arrays[f"vectors_{images}"][row : row + size]
            target.n = size
            if f"hnsw_{images}_{number}_0" in arrays:
                target.indexes = [
                    faiss.deserialize_index(arrays[f"hnsw_{images}_{number}_{p}"])
                    for p in range(images)
                ]
                target.approx = True
            target._tier(self.approx_rows)
            group = (namespace, fingerprint)
            self._groups[group] = target
            self._where.update(dict.fromkeys(target.ids.tolist(), group))
            cursor[images] = (number + 1, row + size)
