"""Build the labelled image set of the quality benchmark.

Usage (from the repo root)::

    .venv/bin/python -m bench.quality.dataset [--cache DIR] [--workers N]

Downloads the Debian packages that ship real pictures (``apt-get download`` + ``dpkg -x``, skipped
when already there), keeps the distinct pictures, and writes derived images plus ``manifest.json``
into the cache directory (default ``~/.cache/vlcache-bench/quality``, outside the repository:
none of these images is committed). The manifest holds::

    {"references": [{"id", "path", "source", "group", "split", "width", "height"}, ...],
     "pairs": [{"query", "reference", "label", "kind", "family", "split", "source"}, ...]}

with paths relative to the cache directory and ``label`` one of

- ``positive``: a benign edit of the reference (``family`` jpeg, scale, crop, format, color, border,
  combo, or text-same: a benign edit of a picture that carries text);
- ``hard_text``: the same picture with other text rendered on it (``family`` price, spec, word,
  number or cjk); query and reference both carry text, in the same font, size, colours and
  place, and only the characters differ;
- ``hard_similar``: another picture of the same scene or the same class of object (bursts, frames,
  stereo pairs, calibration poses, annotation overlays, coins, fruit);
- ``negative``: a sample of unrelated pairs (the full all-vs-all comes from ``references``).

``split`` is ``tune`` or ``held`` by the parity of the base picture's pixel hash: tune on one,
report both. Everything is seeded by the pictures' hashes, so a rerun writes the same set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.quality import edits, sources

DEFAULT_CACHE = Path("~/.cache/vlcache-bench/quality").expanduser()
SINGLE_FAMILIES = ("jpeg", "scale", "crop", "format", "color", "border")
SINGLES_PER_IMAGE = 4
COMBOS_PER_IMAGE = 2
MIN_SIDE_FOR_TEXT = 128
MAX_PAIRS_PER_GROUP = 30
NEGATIVE_SAMPLE = 3000

_GROUP_REASONS = (
    ("kpa:", "burst"),
    ("cv:chessboard", "same-board-other-pose"),
    ("cv:stereo", "stereo-pair"),
    ("ski:motorcycle", "stereo-pair"),
    ("cv:", "frame-pair"),
    ("labelme:video", "video-frames"),
    ("labelme:", "annotation-overlay"),
    ("tux:", "same-class"),
    ("sk:", "same-example-chart"),
)


def split_of(key: str) -> str:
    """``tune`` or ``held``, from the parity of a picture's pixel hash."""
    return "tune" if int(key[:8], 16) % 2 == 0 else "held"


def _write(cache: Path, rel: str, data: bytes) -> str:
    path = cache / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return rel


def _ref_id(item: sources.RealImage) -> str:
    return f"{item.source}-{item.key[:10]}"


def _derive(
    item: sources.RealImage, cache: Path, fonts: dict[str, tuple[Path, int]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write one picture's reference and its positives and text pairs; return their records."""
    rng = random.Random(item.key)
    ident = _ref_id(item)
    split = split_of(item.key)
    native = edits.native_format(item.was_jpeg)
    ext = "jpg" if native[0] == "jpeg" else "png"
    ref = _write(cache, f"images/ref/{ident}.{ext}", edits.encode(item.image, *native))
    record = {
        "id": ident,
        "path": ref,
        "source": item.source,
        "group": item.group,
        "split": split,
        "width": item.image.width,
        "height": item.image.height,
    }
    pairs: list[dict[str, Any]] = []

    def pair(query: str, reference: str, label: str, kind: str, family: str) -> None:
        pairs.append(
            {
                "query": query,
                "reference": reference,
                "label": label,
                "kind": kind,
                "family": family,
                "split": split,
                "source": item.source,
            }
        )

    families = rng.sample(SINGLE_FAMILIES, SINGLES_PER_IMAGE) + ["combo"] * COMBOS_PER_IMAGE
    for n, family in enumerate(families):
        out = edits.benign(item.image, family, rng, native)
        query = _write(cache, f"images/pos/{ident}-{n}-{family}.{out.ext}", out.data)
        pair(query, ref, "positive", out.kind, family)

    if min(item.image.size) >= MIN_SIDE_FOR_TEXT:
        text = edits.render_text_pair(item.image, rng, fonts)
        text_ref = _write(
            cache, f"images/text/{ident}-ref.{ext}", edits.encode(text.reference, *native)
        )
        changed = edits.mild(text.query, rng, native)
        query = _write(cache, f"images/text/{ident}-changed.{changed.ext}", changed.data)
        pair(query, text_ref, "hard_text", f"{text.kind} +{changed.kind}", text.kind.split()[0])
        same = edits.benign(text.reference, rng.choice(SINGLE_FAMILIES), rng, native)
        query = _write(cache, f"images/text/{ident}-same.{same.ext}", same.data)
        pair(query, text_ref, "positive", f"text-same {same.kind}", "text-same")
    return record, pairs


def _group_reason(group: str) -> str:
    for prefix, reason in _GROUP_REASONS:
        if group.startswith(prefix):
            return reason
    return "same-group"


def _cross_pairs(refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hard-similar pairs within each group, and a sample of unrelated pairs."""
    rng = random.Random("pairs")
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ref in refs:
        if ref["group"]:
            by_group[ref["group"]].append(ref)
    pairs: list[dict[str, Any]] = []
    for group, members in sorted(by_group.items()):
        combos = list(itertools.combinations(members, 2))
        if len(combos) > MAX_PAIRS_PER_GROUP:
            combos = rng.sample(combos, MAX_PAIRS_PER_GROUP)
        for a, b in combos:
            pairs.append(
                {
                    "query": b["path"],
                    "reference": a["path"],
                    "label": "hard_similar",
                    "kind": f"{_group_reason(group)} {group}",
                    "family": _group_reason(group),
                    "split": a["split"],
                    "source": a["source"],
                }
            )
    seen: set[tuple[str, str]] = set()
    while len(seen) < min(NEGATIVE_SAMPLE, len(refs) * (len(refs) - 1) // 4):
        a, b = rng.sample(refs, 2)
        if a["group"] is not None and a["group"] == b["group"]:
            continue
        if (a["id"], b["id"]) in seen:
            continue
        seen.add((a["id"], b["id"]))
        pairs.append(
            {
                "query": b["path"],
                "reference": a["path"],
                "label": "negative",
                "kind": f"cross {a['source']}/{b['source']}",
                "family": "cross",
                "split": a["split"],
                "source": a["source"],
            }
        )
    return pairs


def _load(candidate: sources.Candidate) -> sources.RealImage | None:
    return sources.load(candidate)


def _derive_star(args: tuple[sources.RealImage, Path, dict[str, tuple[Path, int]]]) -> Any:
    return _derive(*args)


def build(cache: Path, workers: int) -> dict[str, Any]:
    """Fetch, select and derive everything; write and return the manifest."""
    started = time.perf_counter()
    root = sources.fetch_packages(cache)
    fonts = sources.fonts(root)
    found = sources.candidates(root)
    with ProcessPoolExecutor(workers) as pool:
        loaded = [x for x in pool.map(_load, found, chunksize=16) if x is not None]
        images = sources.distinct(loaded)
        print(
            f"{len(found)} image files, {len(loaded)} usable, {len(images)} distinct "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        shutil.rmtree(cache / "images", ignore_errors=True)
        jobs = [(item, cache, fonts) for item in images]
        results = list(pool.map(_derive_star, jobs, chunksize=4))
    refs = [record for record, _ in results]
    pairs = [p for _, item_pairs in results for p in item_pairs]
    pairs.extend(_cross_pairs(refs))
    manifest = {"version": 1, "references": refs, "pairs": pairs, "fonts": sorted(fonts)}
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    print(f"wrote {cache / 'manifest.json'} ({time.perf_counter() - started:.0f} s)")
    return manifest


def summarise(manifest: dict[str, Any]) -> str:
    """Counts per label, per family, per source and per split, as plain text."""
    refs = manifest["references"]
    pairs = manifest["pairs"]
    lines = [f"distinct reference images: {len(refs)}"]
    by_source = Counter(r["source"] for r in refs)
    lines.append("  by source: " + ", ".join(f"{k} {v}" for k, v in sorted(by_source.items())))
    by_split = Counter(r["split"] for r in refs)
    lines.append("  by split: " + ", ".join(f"{k} {v}" for k, v in sorted(by_split.items())))
    lines.append(f"pairs: {len(pairs)}")
    for label, count in sorted(Counter(p["label"] for p in pairs).items()):
        families = Counter(p["family"] for p in pairs if p["label"] == label)
        detail = ", ".join(f"{k} {v}" for k, v in sorted(families.items()))
        lines.append(f"  {label}: {count}  ({detail})")
    for label in ("positive", "hard_text", "hard_similar"):
        srcs = Counter(p["source"] for p in pairs if p["label"] == label)
        lines.append(
            f"  {label} by source: " + ", ".join(f"{k} {v}" for k, v in sorted(srcs.items()))
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="work directory")
    parser.add_argument("--workers", type=int, default=2, help="processes for decoding/encoding")
    args = parser.parse_args(argv)
    manifest = build(args.cache.expanduser().resolve(), args.workers)
    print(summarise(manifest))


if __name__ == "__main__":
    main()
