"""The quality phase of ``vs_gptcache.py``: the same real-photo sequence through two caches.

The set is ``bench/quality``'s (``python -m bench.quality.dataset`` builds it). A seeded sample of
the reference pictures is *stored*: each reference, and the text-carrying copy of it when the set
has one, is sent once with the quality harness's question and ``Cache-Control: no-cache`` (no
lookup, store the answer). Then the *queries*, each with ``Cache-Control: no-store`` so that only
the stored originals can ever answer them:

- benign edits of a stored original (JPEG, scale, crop, format, colour, border, combinations, and
  benign edits of the text copies): should hit, and hit *their own* original;
- text/digit edits of a stored text copy (same picture, same font and place, other characters):
  must not hit;
- look-alikes: unstored pictures of the same group as a stored one (bursts, stereo pairs, other
  poses of the same board, the same class of coin or fruit): must not hit;
- distinct pictures: as many unstored references as stored ones, from no stored group: must not
  hit.

Which original answered is read from the answer itself: the upstream double's answer id names a
digest of the request it answered, so every stored original has its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

QUESTION = "Describe this picture. What does any text in it say?"  # bench.quality.harness's
LABELS = (
    ("positive", "benign edits (should hit their own original)"),
    ("hard_text", "text/digit edits (must not hit)"),
    ("look_alike", "look-alikes, same group (must not hit)"),
    ("distinct", "distinct pictures (must not hit)"),
)
HEADERS = {"Authorization": "Bearer bench-quality", "Content-Type": "application/json"}


@dataclass(frozen=True)
class Query:
    """One picture to ask about, what it is, and the original it should hit (positives)."""

    path: str
    label: str
    family: str
    original: str | None


@dataclass(frozen=True)
class QualitySet:
    """The originals to store and the queries to ask, in a fixed order."""

    cache: Path
    originals: list[str]
    queries: list[Query]
    stored_refs: int


def build_set(cache: Path, stored_refs: int, seed: str = "vs-gptcache") -> QualitySet:
    """Sample ``stored_refs`` references (0: half the set) and derive every query from them."""
    manifest = json.loads((cache / "manifest.json").read_text())
    refs = list(manifest["references"])
    rng = random.Random(seed)
    rng.shuffle(refs)
    n = len(refs) // 2 if stored_refs <= 0 else min(stored_refs, len(refs) // 2)
    stored, rest = refs[:n], refs[n:]
    stored_paths = {r["path"] for r in stored}
    idents = {Path(r["path"]).stem for r in stored}
    text_refs = sorted(
        {
            p["reference"]
            for p in manifest["pairs"]
            if p["reference"].startswith("images/text/")
            and p["reference"].rsplit("/", 1)[1].rsplit("-ref.", 1)[0] in idents
        }
    )
    originals = [r["path"] for r in stored] + text_refs
    kept = set(originals)
    queries = [
        Query(p["query"], p["label"], p["family"], p["reference"])
        for p in manifest["pairs"]
        if p["label"] in ("positive", "hard_text") and p["reference"] in kept
    ]
    stored_groups = {r["group"] for r in stored if r["group"]}
    by_path = {r["path"]: r for r in refs}
    probes: dict[str, None] = {}
    for p in manifest["pairs"]:
        if p["label"] != "hard_similar":
            continue
        for mine, other in ((p["reference"], p["query"]), (p["query"], p["reference"])):
            if mine in stored_paths and other not in stored_paths:
                probes[other] = None
    distinct = [r for r in rest if not r["group"] or r["group"] not in stored_groups][:n]
    probes.update((r["path"], None) for r in distinct)
    for path in probes:
        group = by_path[path]["group"]
        label = "look_alike" if group and group in stored_groups else "distinct"
        queries.append(Query(path, label, label, None))
    rng.shuffle(queries)
    return QualitySet(cache, originals, queries, n)


def chat_body(cache: Path, rel: str) -> bytes:
    """The OpenAI chat request asking the quality question about one picture."""
    media = mimetypes.guess_type(rel)[0] or "application/octet-stream"
    data = base64.b64encode((cache / rel).read_bytes()).decode()
    parts = [
        {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}},
        {"type": "text", "text": QUESTION},
    ]
    doc = {"model": "qwen3-vl-8b-instruct", "messages": [{"role": "user", "content": parts}]}
    return json.dumps(doc).encode()


@dataclass
class QualityResult:
    """What one cache answered to the sequence."""

    name: str
    stored: Counter[str] = field(default_factory=Counter)
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    families: dict[str, Counter[str]] = field(default_factory=dict)
    false_hits: list[tuple[Query, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, label: str, key: str) -> int:
        """How many queries of ``label`` ended as ``key`` (sent, own, other, miss, ...)."""
        return self.outcomes.get(label, Counter())[key]


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, directive: str
) -> tuple[str, str, str, str]:
    """X-Cache, the answer's id, X-Cache-Match and X-Cache-Similarity of one request."""
    headers = {**HEADERS, "Cache-Control": directive}
    async with session.post(url, data=body, headers=headers) as response:
        raw = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {raw[:200]!r}")
        got = response.headers
        answer_id = str(json.loads(raw).get("id", ""))
        match, similarity = got.get("X-Cache-Match", ""), got.get("X-Cache-Similarity", "")
        return got.get("X-Cache", "?"), answer_id, match, similarity


async def _run(
    name: str, url: str, qs: QualitySet, concurrency: int, settle: float
) -> QualityResult:
    result = QualityResult(name)
    owner: dict[str, str] = {}
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=2 * concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def store(rel: str) -> None:
            body = await asyncio.to_thread(chat_body, qs.cache, rel)
            cache, answer_id, _, _ = await _post(session, url, body, "no-cache")
            result.stored[cache] += 1
            owner[answer_id] = rel

        async def ask(query: Query) -> None:
            body = await asyncio.to_thread(chat_body, qs.cache, query.path)
            cache, answer_id, match, similarity = await _post(session, url, body, "no-store")
            counts = result.outcomes.setdefault(query.label, Counter())
            family = result.families.setdefault(f"{query.label}:{query.family}", Counter())
            counts["sent"] += 1
            family["sent"] += 1
            if cache != "HIT":
                counts["miss"] += 1
                return
            counts[f"hit {match}"] += 1
            original = owner.get(answer_id, "?")
            own = original == query.original
            counts["own" if own else "other"] += 1
            family["own" if own else "other"] += 1
            if query.label != "positive" or not own:
                result.false_hits.append((query, original, similarity))

        # Stores mostly wait for the (paced) upstream: twice as many in flight.
        await _pool(2 * concurrency, [store(rel) for rel in qs.originals])
        # vlcache commits new entries within 0.1 s and semantic candidates are read from SQL.
        await asyncio.sleep(settle)
        await _pool(concurrency, [ask(q) for q in qs.queries])
    result.seconds = time.perf_counter() - started
    return result


async def _pool(size: int, jobs: list) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            await queue.get_nowait()

    await asyncio.gather(*(worker() for _ in range(size)))


def run_quality(
    name: str, url: str, qs: QualitySet, concurrency: int = 2, settle: float = 2.0
) -> QualityResult:
    """Store the originals through ``url`` (``2 x concurrency`` at a time), wait ``settle``
    seconds, then ask every query (``concurrency`` at a time); count the outcomes."""
    return asyncio.run(_run(name, url, qs, concurrency, settle))


def _frac(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.1f}%)" if whole else "-"


def quality_table(results: list[QualityResult]) -> list[str]:
    """Markdown: one row per query kind, one column per cache."""
    names = " | ".join(r.name for r in results)
    lines = [f"| queries | {names} |", "|---|" + "---:|" * len(results)]
    for label, title in LABELS:
        cells = []
        for r in results:
            sent = r.count(label, "sent")
            if label == "positive":
                cell = f"**{_frac(r.count(label, 'own'), sent)}** hit their own original"
                if r.count(label, "other"):
                    cell += f", {r.count(label, 'other')} hit another (false)"
            else:
                hits = r.count(label, "own") + r.count(label, "other")
                cell = f"**{_frac(hits, sent)}** false hits"
            cells.append(cell)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    stored = [", ".join(f"{k} {v}" for k, v in sorted(r.stored.items())) for r in results]
    lines.append("| originals stored (answers) | " + " | ".join(stored) + " |")
    lines.append("| time for the sequence | " + " | ".join(f"{r.seconds:.0f} s" for r in results))
    lines[-1] += " |"
    return lines


def family_table(results: list[QualityResult]) -> list[str]:
    """Markdown: benign edits hitting their own original, and text edits hitting, by family."""
    keys = sorted(
        {k for r in results for k in r.families if k.split(":")[0] in ("positive", "hard_text")}
    )
    lines = [
        "| edit | family | " + " | ".join(r.name for r in results) + " |",
        "|---|---|" + "---:|" * len(results),
    ]
    for key in keys:
        label, family = key.split(":", 1)
        cells = []
        for r in results:
            counts = r.families.get(key, Counter())
            hits = counts["own"] if label == "positive" else counts["own"] + counts["other"]
            cells.append(_frac(hits, counts["sent"]))
        kind = "benign (hit own)" if label == "positive" else "text/digit (false hits)"
        lines.append(f"| {kind} | {family} | " + " | ".join(cells) + " |")
    return lines
