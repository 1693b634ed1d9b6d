"""The markdown of ``vs_gptcache.py``: targets, latency, throughput, set-up and quality tables."""

from __future__ import annotations

import datetime
import shlex
import sys
import time
from typing import TYPE_CHECKING

import _common as c
import vs_gptcache_quality as quality
from exact_hit import Measured

if TYPE_CHECKING:
    import argparse

    from vs_gptcache import Cache, Workload

TARGET_RATIO = 0.5
QUIET_CORES = 0.25
KINDS = (("exact", "exact repeat"), ("semantic", "near-duplicate"))
Baselines = dict[str, dict[str, Measured]]  # "floor" / "double" -> kind -> 1-client latency


def ms(us: float) -> str:
    """Microseconds as milliseconds."""
    return f"{us / 1000:.2f}"


def overhead(cache: Cache, floor: dict[str, Measured], kind: str, pct: str = "p50_us") -> float:
    """A hit's latency minus the floor server's for the same bodies (µs), at one percentile."""
    return float(getattr(cache.latency[kind].run, pct) - getattr(floor[kind].run, pct))


def targets_table(caches: list[Cache], base: Baselines) -> list[str]:
    """The issue's target per hit kind: vlcache's overhead over each GPTCache's, in this run."""
    vl, peers, floor = caches[0], caches[1:], base["floor"]
    lines = [
        "| hit-path overhead = hit - floor, same bodies | vlcache | "
        + " | ".join(p.label for p in peers)
        + f" | target: vlcache / GPTCache <= {TARGET_RATIO:g} |",
        "|---|---:|" + "---:|" * len(peers) + "---|",
    ]
    for kind, title in KINDS:
        for pct, name in (("p50_us", "p50"), ("p99_us", "p99")):
            mine = overhead(vl, floor, kind, pct)
            cells = [f"{ms(overhead(p, floor, kind, pct))} ms" for p in peers]
            verdicts = []
            for p in peers:
                ratio = mine / max(overhead(p, floor, kind, pct), 1.0)
                verdict = f" **{c.verdict(ratio <= TARGET_RATIO)}**" if name == "p50" else ""
                verdicts.append(f"vs {p.label}: {ratio:.2f}{verdict}")
            lines.append(
                f"| {title}, {name} | {ms(mine)} ms | "
                + " | ".join(cells)
                + " | "
                + "; ".join(verdicts)
                + " |"
            )
    for kind, title in KINDS:
        mine = vl.latency[kind].run.p50_us
        ratios = "; ".join(f"vs {p.label}: {mine / p.latency[kind].run.p50_us:.2f}" for p in peers)
        cells = " | ".join(f"{ms(p.latency[kind].run.p50_us)} ms" for p in peers)
        lines.append(
            f"| {title}, whole hit p50 (nothing subtracted) | {ms(mine)} ms | {cells} | {ratios} |"
        )
    return lines


def latency_table(caches: list[Cache], base: Baselines) -> list[str]:
    """1-client percentiles of the baselines and of every cache and hit kind."""
    lines = [
        "| 1 client, sequential | answers | p50 ms | p90 ms | p99 ms | max ms | mean ms "
        "| overhead p50 / p99 ms | server CPU µs/req | other CPU cores | requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows: list[tuple[str, str, Measured, str]] = []
    for name, label in (("floor", "floor server"), ("double", "upstream double, direct")):
        for kind, title in KINDS:
            rows.append((f"{label} ({title} bodies)", "any 200", base[name][kind], ""))
    floor = base["floor"]
    for cache in caches:
        for kind, title in KINDS:
            m = cache.latency[kind]
            answers = f"{m.run.matched}/{m.run.requests} {cache.expect(kind).describe()}"
            extra = (
                f"{ms(overhead(cache, floor, kind))} / {ms(overhead(cache, floor, kind, 'p99_us'))}"
            )
            rows.append((f"{cache.label}, {title}", answers, m, extra))
    for label, answers, m, extra in rows:
        r = m.run
        lines.append(
            f"| {label} | {answers} | {ms(r.p50_us)} | {ms(r.p90_us)} | {ms(r.p99_us)} "
            f"| {ms(r.max_us)} | {ms(r.mean_us)} | {extra} | {m.cpu_us_per_request:,.0f} "
            f"| {m.other_cores:.2f} | {r.requests} |"
        )
    return lines


def hits_per_s(m: Measured) -> float:
    """Answers that were the expected kind of hit, per second."""
    return m.run.matched / m.run.seconds if m.run.seconds else 0.0


def throughput_table(caches: list[Cache], base: dict[str, Measured], connections: int) -> list[str]:
    """Hits per second at ``connections`` clients, with the CPU each server used."""
    lines = [
        f"| {connections} clients | hits/s (expected kind only) | answers | p50 ms | p99 ms "
        "| server CPU cores | server CPU µs/answer | other CPU cores |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    rows = [
        ("floor server (exact body)", base["floor"]),
        ("upstream double, direct (exact body)", base["double"]),
    ]
    rows += [
        (f"{cache.label}, {title}", cache.throughput[kind])
        for cache in caches
        for kind, title in KINDS
    ]
    for label, m in rows:
        r = m.run
        lines.append(
            f"| {label} | {hits_per_s(m):,.1f} | {r.matched:,}/{r.requests:,} "
            f"| {ms(r.p50_us)} | {ms(r.p99_us)} | {m.server_cores:.2f} "
            f"| {m.cpu_us_per_request:,.0f} | {m.other_cores:.2f} |"
        )
    return lines


def throughput_ratios(caches: list[Cache]) -> str:
    """vlcache's hits/s over each GPTCache's, per hit kind."""
    vl = caches[0]
    parts = []
    for kind, title in KINDS:
        mine = hits_per_s(vl.throughput[kind])
        ratios = ", ".join(
            f"{mine / hits_per_s(p.throughput[kind]):.2f}x {p.label}"
            for p in caches[1:]
            if hits_per_s(p.throughput[kind])
        )
        parts.append(f"{title}: {ratios}")
    return "vlcache's hits/s as a multiple of GPTCache's: " + "; ".join(parts) + "."


def setup_text(args: argparse.Namespace, workload: Workload, caches: list[Cache]) -> str:
    """How the servers and the load were set up."""
    calls = ", ".join(f"{cache.label} {cache.upstream_calls}" for cache in caches)
    hit_calls = ", ".join(f"{cache.label} {cache.hit_phase_calls}" for cache in caches)
    return (
        "Set-up, each server its own process on 127.0.0.1: upstream double "
        "`proxy.standin.StandIn` (latency 0); floor server `_common.serve_floor` (reads the "
        "body, answers a fixed JSON: what any Python HTTP server in front of a cache costs); "
        "vlcache `vlcache serve --embedder efficientnet-lite0 --embed-precision fp32 "
        f"--embed-runtime {args.runtime} --embed-threads {args.torch_threads} --log-level "
        "WARNING` (cosine threshold 0.70, its "
        "default for this embedder; otherwise defaults). GPTCache through "
        "`bench/gptcache_server.py`: `Cache` + `get_data_manager(CacheBase('sqlite'), "
        "VectorBase('faiss', top_k=3))`, the same EfficientNet-Lite0 on the same decoded picture "
        f"(fp32, runtime {args.runtime}, threads {args.torch_threads}), "
        "`SearchDistanceEvaluation` (max_distance "
        "4: scores 4 - d²) guarded to 0 for another question, `similarity_threshold` 0.85 = "
        "(1 + 0.70) / 2, the exact equivalent of cosine 0.70 since FAISS's squared L2 on unit "
        "vectors is d² = 2 - 2 cos; `Config(disable_report=True)`; `get`/`put` (through "
        f"`gptcache.adapter.adapter.adapt`) in a pool of {args.gptcache_workers} threads. "
        '"GPTCache + L1" chains an exact `Cache` (map data manager, `ExactMatchEvaluation`, key '
        "= question + sha256 of the image) in front through `next_cache`.\n\n"
        f"Workload: one {workload.jpeg_bytes / 1024:.0f} KB 900x700 photo-like JPEG (quality "
        f"{workload.jpeg_quality}) as a base64 data URI in an OpenAI chat request "
        f"({len(workload.body) / 1024:.0f} KB body), stored once by each cache (upstream calls "
        f"while priming: {calls}; vlcache's second is a near-duplicate probe sent before its "
        "entry was committed). Exact repeat: that body again. Near-duplicate: "
        f"{len(workload.copies)} distinct re-encodings of the photo (JPEG quality 95 down x "
        "chroma subsampling), sent in turn (a semantic hit stores nothing, so every copy stays "
        f"a near-duplicate). Latency: wrk `-t1 -c1`, {args.warmup} warm-up then "
        f"{args.exact_requests} (exact repeat; {args.semantic_requests} where it takes the "
        f"vector path) or {args.semantic_requests} (near-duplicate) sequential requests, each "
        "timed in wrk's LuaJIT from its write to the last byte of its answer; every answer "
        "counted in `answers` carried `X-Cache: HIT` and the expected `X-Cache-Match`. "
        f"Throughput: wrk `-t1 -c{args.connections}`, 2 s warm-up then {args.seconds:g} s, "
        "hits/s counting only answers of the expected kind; wrk shares the cores with the "
        f"server. Upstream POSTs during all hit phases: {hit_calls} (0: every answer came from "
        "the cache)."
    )


def quality_part(args: argparse.Namespace, qs: quality.QualitySet, results: list) -> list[str]:
    """The quality section: what was sent, the outcome table, families, vlcache's false hits."""
    lines = [
        "### Hit rate and correctness on the quality set",
        "",
        f"`{qs.cache}`: {qs.stored_refs} reference pictures sampled (seeded) and stored with "
        f"their text-carrying copies ({len(qs.originals)} originals, `Cache-Control: no-cache`, "
        f"{2 * args.quality_concurrency} at a time), 2 s to settle, then {len(qs.queries)} "
        f"queries with `no-store`, {args.quality_concurrency} at a time; the quality harness's "
        "question for all. Fresh vlcache and GPTCache processes (same flags as above) in front "
        f"of a double that answers after {args.quality_upstream_latency * 1000:.0f} ms (a real "
        "model takes 800-1500 ms; against 0 ms, vlcache's embedding of stored misses, which runs "
        "beside the upstream call, falls behind a client storing back to back). GPTCache + L1 "
        "is left out: its L1 only answers byte-identical requests, and this sequence has none.",
        "",
        *quality.quality_table(results),
        "",
        *quality.family_table(results),
    ]
    for result in results:
        wrong = result.false_hits
        if not wrong or len(wrong) > 12:
            continue
        lines += [
            "",
            f"{result.name}'s wrong answers (hits on an original not the query's own):",
            "",
        ]
        lines += [
            f"- {q.label} `{q.path}` answered with `{original}`'s entry "
            f"(cosine {similarity or '?'})"
            for q, original, similarity in wrong
        ]
    return lines


def report(
    args: argparse.Namespace,
    workload: Workload,
    caches: list[Cache],
    base: Baselines,
    base_tp: dict[str, Measured],
    results: list[quality.QualityResult],
    qs: quality.QualitySet | None,
    quiet: dict[str, float],
    started: float,
    versions: dict[str, str],
) -> str:
    """The markdown section: command, machine, versions, quietness, tables."""
    facts = c.machine_facts()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    quiet_text = ", ".join(f"{v:.2f} {k}" for k, v in quiet.items())
    runs = [m for cache in caches for m in (*cache.latency.values(), *cache.throughput.values())]
    runs += [m for kinds in base.values() for m in kinds.values()] + list(base_tp.values())
    worst = max(m.other_cores for m in runs)
    noisy = " — **noisy run**." if worst >= QUIET_CORES else "."
    parts = [
        f"Command: `{shlex.join([sys.executable, *sys.argv])}` (repo root), {now}, "
        f"{time.perf_counter() - started:.0f} s in all. Code measured: "
        f"{c.describe_source(c.REPO_ROOT)}.",
        "",
        f"Machine: {facts['nproc']} cores ({facts['cpu']}), Linux {facts['kernel']}, Python "
        f"{facts['python']}, aiohttp {facts['aiohttp']}, wrk {facts['wrk']}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f". How quiet: cores kept busy by other processes: {quiet_text}; during the timed runs "
        f"they took up to {worst:.2f} cores (the `other CPU cores` columns; a figure is clean "
        f"only where that is near 0){noisy}",
        "",
        setup_text(args, workload, caches),
        "",
        "### Targets",
        "",
        *targets_table(caches, base),
        "",
        "### Hit latency",
        "",
        *latency_table(caches, base),
        "",
        "### Hit throughput",
        "",
        *throughput_table(caches, base_tp, args.connections),
        "",
        throughput_ratios(caches),
    ]
    if qs is not None and results:
        parts += ["", *quality_part(args, qs, results)]
    return "\n".join(parts)
