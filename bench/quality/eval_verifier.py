"""Run the pixel verifier alone over the quality benchmark's pairs.

Usage (from the repo root, after ``python -m bench.quality.dataset``)::

    .venv/bin/python -m bench.quality.eval_verifier [--cache DIR] [--negatives N] [--results]

Prints, per split (``tune`` / ``held``): the pass rate on positives by edit family, the number of
text/digit edits that pass (must be 0), the pass rate on hard-similar pairs by reason and on a
sample of distinct negatives; the milliseconds per ``make_thumbnail`` and per ``verify`` call
(median / p99) and the bytes per thumbnail. Also prints, for tuning, the largest threshold at which
no text edit of the tune split passes and what recall that would give.

Every pair's verdict and measurements are written to ``verifier_scores.json`` in the cache
directory, for the full quality harness (embedding threshold + verifier). ``--results`` also writes
the summary into ``bench/RESULTS.md`` (section "Quality: verifier alone").
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import _common
from bench.quality import pipeline
from bench.quality.dataset import DEFAULT_CACHE
from embeddings import verifier
from proxy.semantic import decode_picture

LABELS = ("positive", "hard_text", "hard_similar", "negative")
MAX_PIXELS = 50_000_000


def _ms(values: Sequence[float]) -> str:
    arr = np.asarray(values) * 1e3
    return f"median {np.median(arr):.2f} ms, p99 {np.percentile(arr, 99):.2f} ms (n={arr.size})"


def _rate(flags: Sequence[bool]) -> str:
    return f"{sum(flags)}/{len(flags)} = {100 * sum(flags) / max(1, len(flags)):.1f}%"


def _thumbnails(cache: Path, paths: set[str]) -> tuple[dict[str, bytes], list[float]]:
    """Thumbnails made the way the proxy makes them: ``decode_picture``, ``make_thumbnail``."""
    thumbs: dict[str, bytes] = {}
    times: list[float] = []
    for n, rel in enumerate(sorted(paths)):
        image = decode_picture((cache / rel).read_bytes(), MAX_PIXELS)
        started = time.perf_counter()
        thumbs[rel] = verifier.make_thumbnail(image)
        times.append(time.perf_counter() - started)
        if n % 1000 == 999:
            print(f"  {n + 1} thumbnails", file=sys.stderr, flush=True)
    return thumbs, times


def evaluate(cache: Path, negatives: int) -> tuple[list[dict[str, Any]], str]:
    """Verify every pair of the manifest (and a sample of negatives); return records and report."""
    manifest = json.loads((cache / "manifest.json").read_text())
    pairs = [p for p in manifest["pairs"] if p["label"] != "negative"]
    negative = [p for p in manifest["pairs"] if p["label"] == "negative"]
    pairs += random.Random("eval").sample(negative, min(negatives, len(negative)))
    load = _common.background_load(1.0)
    with _common.timed(f"thumbnails of {len(pairs)} pairs"):
        thumbs, thumb_times = _thumbnails(
            cache, {p["query"] for p in pairs} | {p["reference"] for p in pairs}
        )
    records: list[dict[str, Any]] = []
    verify_times: list[float] = []
    with _common.timed(f"verify {len(pairs)} pairs"):
        for pair in pairs:
            query, stored = thumbs[pair["query"]], thumbs[pair["reference"]]
            started = time.perf_counter()
            verdict = verifier.verify(query, stored)
            verify_times.append(time.perf_counter() - started)
            # compare() repeats the work verify() did, outside the timed region, for the details.
            detail = verifier.compare(query, stored)
            records.append(
                {
                    **pair,
                    "passed": verdict.passed,
                    "score": verdict.score if np.isfinite(verdict.score) else None,
                    "worst": detail.worst if np.isfinite(detail.worst) else None,
                    "noise": detail.noise,
                    "contrast": detail.contrast,
                    "overlap": detail.overlap,
                    "scale": detail.scale,
                    "reason": verdict.reason,
                }
            )
    sizes = [len(b) for b in thumbs.values()]
    lines = [
        f"Verifier alone over `{cache / 'manifest.json'}`: "
        f"{len(manifest['references'])} distinct pictures, {len(records)} pairs "
        f"({negatives} sampled distinct negatives). THRESHOLD={verifier.THRESHOLD}, "
        f"NOISE_MAX={verifier.NOISE_MAX}, NOISE_MAX_RELATIVE={verifier.NOISE_MAX_RELATIVE}, "
        f"NOISE_BAND_MAX={verifier.NOISE_BAND_MAX}, "
        f"NOISE_BAND_RELATIVE={verifier.NOISE_BAND_RELATIVE}, "
        f"THUMB_AREA={verifier.THUMB_AREA}; pictures decoded "
        "with proxy.semantic.decode_picture as the proxy does.",
        "",
        f"- make_thumbnail: {_ms(thumb_times)}",
        f"- verify: {_ms(verify_times)}",
        f"- bytes per thumbnail: median {statistics.median(sizes):.0f}, "
        f"p95 {np.percentile(sizes, 95):.0f}, max {max(sizes)}",
        f"- other processes kept {load:.2f} cores busy when the run started",
        "",
        "| label | family / reason | tune | held |",
        "|---|---|---|---|",
    ]
    for label in LABELS:
        subset = [r for r in records if r["label"] == label]
        by_family: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for r in subset:
            by_family[r["family"]][r["split"]].append(r["passed"])
            by_family["(all)"][r["split"]].append(r["passed"])
        for family in sorted(by_family, key=lambda f: (f != "(all)", f)):
            cells = [_rate(by_family[family].get(s, [])) for s in ("tune", "held")]
            lines.append(f"| {label} | {family} | {cells[0]} | {cells[1]} |")
    leaked = [r for r in records if r["label"] == "hard_text" and r["passed"]]
    lines += ["", f"Text/digit edits that pass: {len(leaked)}"]
    lines += [f"- {r['kind']} ({r['query']}, score {r['score']:.2f})" for r in leaked[:20]]
    lines += ["", _tuning_hint(records)]
    return records, "\n".join(lines)


def _tuning_hint(records: list[dict[str, Any]]) -> str:
    """Where THRESHOLD could sit: just under the tune split's lowest text-edit score."""

    def score(r: dict[str, Any]) -> float:
        if r["worst"] is None:
            return float("inf")
        if verifier.differs_throughout(float(r["noise"]), float(r["contrast"])):
            return float("inf")
        return float(r["worst"]) / (float(r["noise"]) + verifier.NOISE_FLOOR)

    text = sorted(score(r) for r in records if r["label"] == "hard_text" and r["split"] == "tune")
    if not text:
        return ""
    ceiling = text[0]
    parts = [f"Tuning: lowest text-edit score on the tune split {ceiling:.2f} (next {text[1:4]})."]
    for split in ("tune", "held"):
        pos = [
            score(r) < ceiling for r in records if r["label"] == "positive" and r["split"] == split
        ]
        parts.append(f"With THRESHOLD just under it, {split} recall would be {_rate(pos)}.")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="dataset directory")
    parser.add_argument("--negatives", type=int, default=1000, help="distinct pairs to sample")
    parser.add_argument("--results", action="store_true", help="write into bench/RESULTS.md")
    args = parser.parse_args(argv)
    cache = args.cache.expanduser().resolve()
    records, report = evaluate(cache, args.negatives)
    saved = {"pipeline": pipeline.VERDICTS, "records": records}
    (cache / "verifier_scores.json").write_text(json.dumps(saved, ensure_ascii=False))
    print(report)
    print(f"\nper-pair scores: {cache / 'verifier_scores.json'}")
    if args.results:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        command = shlex.join([sys.executable, "-m", "bench.quality.eval_verifier", *sys.argv[1:]])
        text = f"`{command}`, {stamp}, {_common.describe_source(_common.REPO_ROOT)}.\n\n{report}"
        _common.replace_section("Quality: verifier alone", text)


if __name__ == "__main__":
    main()
