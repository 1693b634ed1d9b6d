"""Quality of the semantic tier: embedding threshold + pixel verifier over the labelled pairs.

Usage (from the repo root, after ``python -m bench.quality.dataset`` and, for the cached verdicts,
``python -m bench.quality.eval_verifier``)::

    .venv/bin/python -m bench.quality.harness [--cache DIR] [--e2e N] [--results]

1. Embeds every picture of the manifest once with the offline embedder (EfficientNet-Lite0, fp32,
   2 threads), decoded exactly as ``proxy/semantic.py`` decodes them; the vectors are cached in
   ``embeddings-efficientnet-lite0-fp32-<code digest>.npz`` in the dataset directory, keyed by
   path + mtime (``bench.quality.pipeline``: other decoding or preprocessing code, another file).
2. For every labelled pair: cosine, and the verifier's verdict (from ``verifier_scores.json`` when
   it was made by the same code, else computed). A pair is a hit when cosine >= threshold and the
   verifier passes.
3. Distinct pictures: all-vs-all over the reference pictures (pairs of the same group are
   ``hard_similar``, not distinct), cosines by one matrix product; the verifier runs lazily only on
   the pairs above the lowest threshold of the curve, in both directions (a hit either way counts).
4. Picks the threshold that maximises tune-split recall subject to distinct false hits <= 0.1 %
   and no text-edit hit on the tune split; reports it on both splits.
5. ``--e2e N``: N reference pictures through the real proxy (in-process, stand-in upstream): the
   reference (MISS), settle, then its positives and text edits with the same question and
   credential (``Cache-Control: no-store`` so that only the reference is a candidate of its own
   variants; every reference shares one question, so another reference can be hit, and is counted).
``--results`` writes the report into ``bench/RESULTS.md`` ("Semantic quality (issue 3)").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import random
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import _common
from bench.quality import pipeline
from bench.quality.dataset import DEFAULT_CACHE
from embeddings.efficientnet import EFFICIENTNET_DEFAULT_THRESHOLD
from embeddings.verifier import make_thumbnail, verify
from proxy.semantic import decode_picture

MAX_PIXELS = 40_000_000  # Settings.max_image_pixels
BATCH = 16
MODEL = "efficientnet-lite0"
THRESHOLDS = tuple(round(0.60 + 0.01 * i, 2) for i in range(39))  # 0.60 .. 0.98
SHOWN = tuple(t for t in THRESHOLDS if round(t * 100) % (4 if t < 0.7 else 2) == 0)
MAX_DISTINCT_FALSE = 0.001
LABELS = ("positive", "hard_text", "hard_similar", "negative")
SPLITS = ("tune", "held")
QUESTION = "Describe this picture. What does any text in it say?"
CREDENTIAL = {"Authorization": "Bearer sk-quality-bench"}


# --- embeddings ----------------------------------------------------------------------------------


_VECTORS = f"embeddings-{MODEL}-fp32-{pipeline.VECTORS}"


def _key(cache: Path, rel: str) -> str:
    return f"{rel}|{(cache / rel).stat().st_mtime_ns}"


def _decode(path: Path) -> Any:
    return decode_picture(path.read_bytes(), MAX_PIXELS)


def _load_vectors(cache: Path) -> dict[str, np.ndarray]:
    known: dict[str, np.ndarray] = {}
    for store in sorted(cache.glob(f"{_VECTORS}*.npz")):
        with np.load(store) as npz:
            known.update(zip(npz["keys"].tolist(), npz["vectors"], strict=True))
    return known


def _save_vectors(store: Path, vectors: dict[str, np.ndarray]) -> None:
    kept = sorted(vectors)
    tmp = store.with_suffix(".tmp.npz")
    np.savez(tmp, keys=np.array(kept), vectors=np.stack([vectors[k] for k in kept]))
    tmp.replace(store)


def embed_all(
    cache: Path, paths: Sequence[str], embedder: Any, shard: tuple[int, int] = (0, 1)
) -> dict[str, np.ndarray]:
    """Unit vectors of ``paths``, from the npz cache or computed (and then cached).

    ``shard`` (k, n) embeds only every n-th missing picture, from the k-th, into its own file
    (checkpointed as it goes), so that several processes can share the first run.
    """
    known = _load_vectors(cache)
    keys = {rel: _key(cache, rel) for rel in paths}
    missing = [rel for rel in paths if keys[rel] not in known]
    k, n = shard
    missing = missing[k::n]
    store = cache / f"{_VECTORS}{'' if n == 1 else f'-shard{k}'}.npz"
    shards = sorted(cache.glob(f"{_VECTORS}-shard*.npz"))
    if missing or (n == 1 and shards):
        fresh: dict[str, np.ndarray] = {}
        with _common.timed(f"embed {len(missing)} pictures (batch {BATCH})"):
            for start in range(0, len(missing), BATCH):
                chunk = missing[start : start + BATCH]
                images = [_decode(cache / rel) for rel in chunk]
                for rel, vector in zip(chunk, embedder.embed(images), strict=True):
                    fresh[keys[rel]] = np.asarray(vector, np.float32)
                if start % (20 * BATCH) == 0:
                    print(f"  {start + len(chunk)}/{len(missing)}", file=sys.stderr, flush=True)
                    if n > 1:
                        _save_vectors(store, fresh)
        known.update(fresh)
        if n > 1:
            _save_vectors(store, fresh)
            return {}
        wanted = {keys[rel] for rel in paths}
        _save_vectors(store, {key: v for key, v in known.items() if key in wanted})
        for extra in shards:
            extra.unlink()
    return {rel: known[keys[rel]] for rel in paths}


# --- verifier ------------------------------------------------------------------------------------


class Verdicts:
    """Verifier verdicts: cached ones from ``verifier_scores.json``, the rest computed lazily."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.known: dict[tuple[str, str], bool] = {}
        scores = cache / "verifier_scores.json"
        saved = json.loads(scores.read_text()) if scores.exists() else {}
        if saved.get("pipeline") == pipeline.VERDICTS:
            for r in saved["records"]:
                self.known[(r["query"], r["reference"])] = bool(r["passed"])
        self.thumbs: dict[str, bytes] = {}
        self.computed = 0
        self.reused = 0

    def _thumb(self, rel: str) -> bytes:
        if rel not in self.thumbs:
            self.thumbs[rel] = make_thumbnail(_decode(self.cache / rel))
        return self.thumbs[rel]

    def passed(self, query: str, reference: str) -> bool:
        """Whether the verifier accepts ``query`` as the stored ``reference``."""
        if (query, reference) in self.known:
            self.reused += 1
            return self.known[(query, reference)]
        self.computed += 1
        verdict = verify(self._thumb(query), self._thumb(reference)).passed
        self.known[(query, reference)] = verdict
        return verdict


# --- evaluation ----------------------------------------------------------------------------------


def _pct(hits: int, total: int) -> str:
    return f"{100 * hits / total:.2f}%" if total else "-"


def _frac(hits: int, total: int) -> str:
    return f"{hits}/{total} ({_pct(hits, total)})"


class Evaluation:
    """Cosines and verdicts of every labelled pair and of all distinct reference pairs."""

    def __init__(self, cache: Path, manifest: dict[str, Any], vectors: dict[str, np.ndarray]):
        self.verdicts = Verdicts(cache)
        pairs = [p for p in manifest["pairs"] if p["label"] != "negative"]
        self.pairs = pairs
        q = np.stack([vectors[p["query"]] for p in pairs])
        r = np.stack([vectors[p["reference"]] for p in pairs])
        self.cos = np.einsum("ij,ij->i", q, r)
        with _common.timed(f"verdicts of {len(pairs)} labelled pairs"):
            self.ok = np.array([self.verdicts.passed(p["query"], p["reference"]) for p in pairs])
        # All-vs-all distinct references.
        refs = manifest["references"]
        mat = np.stack([vectors[x["path"]] for x in refs])
        sims = mat @ mat.T
        n = len(refs)
        iu, ju = np.triu_indices(n, k=1)
        groups = [x.get("group") for x in refs]
        same = np.array(
            [groups[i] is not None and groups[i] == groups[j] for i, j in zip(iu, ju, strict=True)]
        )
        similar = {frozenset((p["query"], p["reference"])) for p in pairs}
        labelled = np.array(
            [
                frozenset((refs[i]["path"], refs[j]["path"])) in similar
                for i, j in zip(iu, ju, strict=True)
            ]
        )
        keep = ~same & ~labelled
        self.d_i, self.d_j = iu[keep], ju[keep]
        self.d_cos = sims[self.d_i, self.d_j]
        splits = [x["split"] for x in refs]
        self.d_split = np.array(
            [
                splits[i] if splits[i] == splits[j] else "mixed"
                for i, j in zip(self.d_i, self.d_j, strict=True)
            ]
        )
        self.excluded_same_group = int(same.sum())
        lowest = min(THRESHOLDS)
        todo = np.flatnonzero(self.d_cos >= lowest)
        self.d_ok = np.zeros(self.d_cos.shape, bool)
        self.d_verified = len(todo)
        started = time.perf_counter()
        with _common.timed(f"verify {len(todo)} distinct pairs with cosine >= {lowest}"):
            for k in todo:
                a, b = refs[self.d_i[k]]["path"], refs[self.d_j[k]]["path"]
                self.d_ok[k] = self.verdicts.passed(a, b) or self.verdicts.passed(b, a)
        self.d_verify_seconds = time.perf_counter() - started
        self.n_refs = n
        self.d_false = [
            (refs[self.d_i[k]]["path"], refs[self.d_j[k]]["path"], float(self.d_cos[k]))
            for k in todo
            if self.d_ok[k]
        ]
        self.max_distinct_cos = float(self.d_cos.max())

    def select(self, label: str, split: str | None = None, family: str | None = None) -> np.ndarray:
        """Indices of the labelled pairs with this label (and split, family)."""
        return np.array(
            [
                i
                for i, p in enumerate(self.pairs)
                if p["label"] == label
                and (split is None or p["split"] == split)
                and (family is None or p["family"] == family)
            ],
            dtype=int,
        )

    def rate(self, idx: np.ndarray, t: float, verified: bool = True) -> tuple[int, int]:
        """(hits, total) among labelled pairs ``idx`` at threshold ``t``."""
        hit = self.cos[idx] >= t
        if verified:
            hit &= self.ok[idx]
        return int(hit.sum()), len(idx)

    def distinct(
        self, t: float, split: str | None = None, verified: bool = True
    ) -> tuple[int, int]:
        """(false hits, pairs) among the distinct reference pairs at threshold ``t``."""
        mask = np.ones(self.d_cos.shape, bool) if split is None else self.d_split == split
        hit = (self.d_cos >= t) & mask
        if verified:
            hit &= self.d_ok
        return int(hit.sum()), int(mask.sum())

    def choose(self) -> tuple[float, list[str]]:
        """The tune split's best threshold under the constraints, and why."""
        tune_pos = self.select("positive", "tune")
        tune_text = self.select("hard_text", "tune")
        feasible = []
        for t in THRESHOLDS:
            fh, fn = self.distinct(t, "tune")
            th, _ = self.rate(tune_text, t)
            if fh <= MAX_DISTINCT_FALSE * fn and th == 0:
                feasible.append((self.rate(tune_pos, t)[0], t))
        if not feasible:
            return max(THRESHOLDS), ["no threshold of the grid meets the constraints on tune"]
        best = max(r for r, _ in feasible)
        # Among equally good thresholds take the highest (the safest).
        chosen = max(t for r, t in feasible if r == best)
        lowest = min(t for _, t in feasible)
        why = [f"feasible on tune from {lowest:.2f} up"]
        if chosen == min(THRESHOLDS):
            why.append("the constraints do not bind anywhere on the grid")
        return chosen, why


def curve_table(ev: Evaluation, chosen: float) -> list[str]:
    """The compact curve: all splits together, verified and embedding-only."""
    shown = sorted(set(SHOWN) | {chosen, EFFICIENTNET_DEFAULT_THRESHOLD})
    pos, text, sim = ev.select("positive"), ev.select("hard_text"), ev.select("hard_similar")
    lines = [
        "| threshold | recall (emb+ver) | recall (emb only) | distinct false (emb+ver) "
        "| distinct false (emb only) | hard_similar (emb+ver / emb) | hard_text (emb+ver / emb) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in shown:
        rh, rn = ev.rate(pos, t)
        re_, _ = ev.rate(pos, t, verified=False)
        dh, dn = ev.distinct(t)
        de, _ = ev.distinct(t, verified=False)
        sh, sn = ev.rate(sim, t)
        se, _ = ev.rate(sim, t, verified=False)
        th, tn = ev.rate(text, t)
        te, _ = ev.rate(text, t, verified=False)
        mark = " **(chosen)**" if t == chosen else ""
        mark += " (current default)" if t == EFFICIENTNET_DEFAULT_THRESHOLD else ""
        lines.append(
            f"| {t:.2f}{mark} | {_pct(rh, rn)} | {_pct(re_, rn)} | {dh} ({_pct(dh, dn)}) "
            f"| {de} ({_pct(de, dn)}) | {sh} / {se} of {sn} | {th} / {te} of {tn} |"
        )
    return lines


def split_report(ev: Evaluation, t: float) -> list[str]:
    """Every label at threshold ``t``, per split, recall by family."""
    lines = [
        f"At threshold {t:.2f} (emb+ver; emb only in brackets):",
        "",
        "| label | family | tune | held |",
        "|---|---|---|---|",
    ]
    for label in ("positive", "hard_text", "hard_similar"):
        families = sorted({p["family"] for p in ev.pairs if p["label"] == label})
        for family in [None, *families]:
            cells = []
            for split in SPLITS:
                idx = ev.select(label, split, family)
                h, n = ev.rate(idx, t)
                e, _ = ev.rate(idx, t, verified=False)
                cells.append(f"{_frac(h, n)} [{_pct(e, n)}]")
            lines.append(f"| {label} | {family or '(all)'} | {cells[0]} | {cells[1]} |")
    cells = []
    for split in SPLITS:
        h, n = ev.distinct(t, split)
        e, _ = ev.distinct(t, split, verified=False)
        cells.append(f"{_frac(h, n)} [{e}]")
    lines.append(f"| distinct (all-vs-all refs) | - | {cells[0]} | {cells[1]} |")
    h, n = ev.distinct(t, "mixed")
    lines.append(f"| distinct, tune x held refs | - | {_frac(h, n)} | |")
    return lines


def verifier_ceiling(ev: Evaluation) -> str:
    """Recall of the verifier alone (cosine ignored): the most any threshold can give."""
    parts = []
    for split in SPLITS:
        idx = ev.select("positive", split)
        parts.append(f"{split} {_frac(int(ev.ok[idx].sum()), len(idx))}")
    return "Verifier alone passes positives: " + ", ".join(parts) + "."


# --- end to end ----------------------------------------------------------------------------------


def _media(rel: str) -> str:
    return mimetypes.guess_type(rel)[0] or "application/octet-stream"


def _body(cache: Path, rel: str) -> bytes:
    import base64

    data = base64.b64encode((cache / rel).read_bytes()).decode()
    parts = [
        {"type": "image_url", "image_url": {"url": f"data:{_media(rel)};base64,{data}"}},
        {"type": "text", "text": QUESTION},
    ]
    doc = {"model": "qwen3-vl-8b-instruct", "messages": [{"role": "user", "content": parts}]}
    return json.dumps(doc).encode()


async def _e2e(
    cache: Path, embedder: Any, threshold: float, refs: list[str], variants: dict[str, list[dict]]
) -> dict[str, Any]:
    import aiohttp
    from aiohttp import web

    from proxy.app import create_app, settle
    from proxy.settings import Settings
    from proxy.standin import StandIn

    standin = StandIn(latency=0.0)
    up_runner = web.AppRunner(standin.app(), access_log=None)
    await up_runner.setup()
    up_site = web.TCPSite(up_runner, "127.0.0.1", 0)
    await up_site.start()
    up_port = up_runner.addresses[0][1]
    out: dict[str, Any] = defaultdict(int)
    out["records"] = []
    with tempfile.TemporaryDirectory(prefix="vlcache-quality-") as tmp:
        settings = Settings(
            upstream=f"http://127.0.0.1:{up_port}",
            data_dir=Path(tmp),
            embedder=MODEL,
            threshold=threshold,
        )
        app = create_app(settings, embedder=embedder)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
        headers = {**CREDENTIAL, "Content-Type": "application/json"}
        try:
            async with aiohttp.ClientSession() as client:

                async def send(rel: str, extra: dict[str, str]) -> dict[str, str]:
                    body = _body(cache, rel)
                    async with client.post(url, data=body, headers={**headers, **extra}) as r:
                        await r.read()
                        if r.status != 200:
                            raise RuntimeError(f"{rel}: HTTP {r.status}")
                        return dict(r.headers)

                for ref in refs:
                    calls = len(standin.chat_calls)
                    first = await send(ref, {})
                    out["ref_sent"] += 1
                    out[f"ref_{first.get('X-Cache', '?')}"] += 1
                    out["upstream_refs"] += len(standin.chat_calls) - calls
                    await settle(app)
                    entry = first.get("X-Cache-Entry")
                    for pair in variants[ref]:
                        calls = len(standin.chat_calls)
                        got = await send(pair["query"], {"Cache-Control": "no-store"})
                        upstream = len(standin.chat_calls) - calls
                        hit = got.get("X-Cache") == "HIT"
                        own = hit and entry is not None and got.get("X-Cache-Entry") == entry
                        out["upstream_variants"] += upstream
                        out[f"{pair['label']}_sent"] += 1
                        out[f"{pair['label']}_hit"] += hit
                        out[f"{pair['label']}_hit_own"] += own
                        out[f"{pair['label']}_hit_other"] += hit and not own
                        out[f"{pair['label']}_upstream"] += upstream
                        out["records"].append(
                            {
                                **pair,
                                "x_cache": got.get("X-Cache"),
                                "match": got.get("X-Cache-Match"),
                                "similarity": got.get("X-Cache-Similarity"),
                                "own": own,
                            }
                        )
        finally:
            await runner.cleanup()
            await up_runner.cleanup()
    out["upstream_total"] = len(standin.chat_calls)
    return out


def e2e(
    cache: Path, ev: Evaluation, embedder: Any, threshold: float, count: int
) -> tuple[list[str], dict[str, Any]]:
    """Send ``count`` references and their variants through the proxy; compare with the raw."""
    by_ref: dict[str, list[dict]] = defaultdict(list)
    predicted: dict[tuple[str, str], bool] = {}
    for i, p in enumerate(ev.pairs):
        if p["label"] in ("positive", "hard_text"):
            by_ref[p["reference"]].append(p)
            predicted[(p["query"], p["reference"])] = bool(ev.cos[i] >= threshold and ev.ok[i])
    rng = random.Random("e2e")
    text_refs = sorted(r for r in by_ref if any(p["label"] == "hard_text" for p in by_ref[r]))
    plain = sorted(r for r in by_ref if r not in set(text_refs))
    n_text = min(len(text_refs), count // 3)
    refs = rng.sample(text_refs, n_text) + rng.sample(plain, min(len(plain), count - n_text))
    rng.shuffle(refs)
    started = time.perf_counter()
    with _common.timed(f"end to end: {len(refs)} references through the proxy"):
        out = asyncio.run(_e2e(cache, embedder, threshold, refs, by_ref))
    seconds = time.perf_counter() - started
    agree = disagree = 0
    mismatches = []
    for rec in out["records"]:
        want = predicted[(rec["query"], rec["reference"])]
        if want == bool(rec["own"]):
            agree += 1
        else:
            disagree += 1
            mismatches.append(rec)
    pos_n, pos_h = out["positive_sent"], out["positive_hit_own"]
    raw_pos = sum(
        predicted[(r["query"], r["reference"])] for r in out["records"] if r["label"] == "positive"
    )
    lines = [
        f"End to end through the proxy (threshold {threshold:.2f}, stand-in upstream, latency 0; "
        f"{len(refs)} references, {n_text} of them carrying text; one question and one "
        f"credential for all; variants sent with `Cache-Control: no-store`; {seconds:.0f} s):",
        "",
        f"- references: {out['ref_sent']} sent, {out.get('ref_MISS', 0)} MISS, "
        f"{out['ref_sent'] - out.get('ref_MISS', 0)} other (a reference hitting another "
        f"reference's entry would be a false hit), {out['upstream_refs']} upstream calls",
        f"- positives: {_frac(pos_h, pos_n)} HIT on their own reference's entry "
        f"(raw vectors + verifier predict {raw_pos}); "
        f"{out['positive_hit_other']} HIT on another entry; "
        f"{out['positive_upstream']} upstream calls",
        f"- text/digit edits: {out['hard_text_hit']} HIT of {out['hard_text_sent']} "
        f"({out['hard_text_upstream']} upstream calls)",
        f"- upstream calls in total: {out['upstream_total']} "
        f"= {out['ref_sent']} references + {out['upstream_variants']} variant misses",
        f"- per-request agreement with the raw vectors + verifier: {agree} agree, "
        f"{disagree} differ",
    ]
    for rec in mismatches[:10]:
        lines.append(
            f"  - {rec['label']} {rec['kind']} {rec['query']}: proxy {rec['x_cache']} "
            f"(sim {rec['similarity']}, own {rec['own']})"
        )
    return lines, out


# --- main ----------------------------------------------------------------------------------------


def _paths(manifest: dict[str, Any]) -> list[str]:
    seen: dict[str, None] = {}
    for r in manifest["references"]:
        seen[r["path"]] = None
    for p in manifest["pairs"]:
        seen[p["query"]] = None
        seen[p["reference"]] = None
    return list(seen)


def report(cache: Path, manifest: dict[str, Any], ev: Evaluation, chosen: float) -> list[str]:
    """Dataset counts, curve, chosen threshold on both splits."""
    counts = defaultdict(int)
    for p in ev.pairs:
        counts[(p["label"], p["split"])] += 1
    tot = {split: int((ev.d_split == split).sum()) for split in (*SPLITS, "mixed")}
    lines = [
        f"Dataset `{cache}`: {len(manifest['references'])} reference pictures; labelled pairs "
        + ", ".join(
            f"{label} {counts[(label, 'tune')]} tune / {counts[(label, 'held')]} held"
            for label in ("positive", "hard_text", "hard_similar")
        )
        + f"; distinct pairs all-vs-all {len(ev.d_cos)} (tune {tot['tune']}, held {tot['held']}, "
        f"tune x held {tot['mixed']}; {ev.excluded_same_group} same-group pairs left out as "
        "hard_similar). Pictures decoded by `proxy.semantic.decode_picture` (max_pixels 40M) as "
        "the proxy does, embedded by EfficientNet-Lite0 fp32 (2 threads).",
        "",
        f"Verifier: {ev.verdicts.reused} verdicts reused from verifier_scores.json, "
        f"{ev.verdicts.computed} computed; the distinct pairs needing it (cosine >= "
        f"{min(THRESHOLDS):.2f}) were {ev.d_verified} of {len(ev.d_cos)} "
        f"(both directions, {ev.d_verify_seconds:.0f} s). Highest distinct cosine "
        f"{ev.max_distinct_cos:.4f}. {verifier_ceiling(ev)}",
        "",
        "Distinct reference pairs the verifier passes (cosine >= "
        f"{min(THRESHOLDS):.2f}): {len(ev.d_false)}",
        *(
            f"- `{a}` vs `{b}`: cosine {c:.4f}"
            for a, b, c in sorted(ev.d_false, key=lambda x: -x[2])
        ),
        "",
        "Curve (both splits together; a hit = cosine >= threshold and, for emb+ver, the verifier "
        "passes):",
        "",
        *curve_table(ev, chosen),
        "",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="dataset directory")
    parser.add_argument("--e2e", type=int, default=60, help="references sent through the proxy")
    parser.add_argument("--results", action="store_true", help="write into bench/RESULTS.md")
    parser.add_argument(
        "--embed-shard", default=None, help="K/N: only embed that share of the pictures, then exit"
    )
    parser.add_argument("--threads", type=int, default=2, help="embedder threads")
    args = parser.parse_args(argv)
    cache = args.cache.expanduser().resolve()
    manifest = json.loads((cache / "manifest.json").read_text())

    from embeddings.embedder import load_embedder

    embedder = load_embedder(MODEL, precision="fp32", threads=args.threads)
    if args.embed_shard:
        k, n = (int(x) for x in args.embed_shard.split("/"))
        embed_all(cache, _paths(manifest), embedder, (k, n))
        return
    load = _common.background_load(1.0)
    vectors = embed_all(cache, _paths(manifest), embedder)
    ev = Evaluation(cache, manifest, vectors)
    chosen, why = ev.choose()
    lines = report(cache, manifest, ev, chosen)
    lines += [
        f"Chosen threshold (max tune recall s.t. distinct false hits <= "
        f"{100 * MAX_DISTINCT_FALSE:.1f}% and 0 text-edit hits on tune): **{chosen:.2f}** "
        f"({'; '.join(why)}); current default {EFFICIENTNET_DEFAULT_THRESHOLD:.2f}.",
        "",
        *split_report(ev, chosen),
        "",
    ]
    if chosen != EFFICIENTNET_DEFAULT_THRESHOLD:
        lines += [*split_report(ev, EFFICIENTNET_DEFAULT_THRESHOLD), ""]
    lines += _targets(ev, chosen)
    if args.e2e:
        e2e_lines, _ = e2e(cache, ev, embedder, chosen, args.e2e)
        lines += ["", *e2e_lines]
    lines += ["", f"Other processes kept {load:.2f} cores busy when the run started."]
    text = "\n".join(lines)
    print(text)
    if args.results:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        facts = _common.machine_facts()
        command = shlex.join([sys.executable, "-m", "bench.quality.harness", *sys.argv[1:]])
        head = (
            f"`{command}`, {stamp}, {_common.describe_source(_common.REPO_ROOT)}; "
            f"{facts['nproc']} cores ({facts['cpu']}), Python {facts['python']}."
        )
        _common.replace_section("Semantic quality (issue 3)", head + "\n\n" + text)


def _targets(ev: Evaluation, t: float) -> list[str]:
    lines = ["Targets at the chosen threshold:", ""]
    for split in SPLITS:
        rh, rn = ev.rate(ev.select("positive", split), t)
        dh, dn = ev.distinct(t, split)
        th, _ = ev.rate(ev.select("hard_text", split), t)
        verdicts: Iterable[tuple[str, bool]] = (
            (f"recall {_pct(rh, rn)} >= 95%", rh >= 0.95 * rn),
            (f"distinct false hits {_pct(dh, dn)} <= 0.1%", dh <= MAX_DISTINCT_FALSE * dn),
            (f"text-edit hits {th} == 0", th == 0),
        )
        lines.append(
            f"- {split}: "
            + "; ".join(f"{what} **{'PASS' if ok else 'FAIL'}**" for what, ok in verdicts)
        )
    return lines


if __name__ == "__main__":
    main()
