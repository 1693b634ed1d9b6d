"""Exact-hit path benchmark (issue 2): vlcache against its upstream double and a floor server.

Run from the repo root: ``.venv/bin/python bench/exact_hit.py`` (about 2 minutes).

Three kinds of server, each in its own process, all on 127.0.0.1:

- the upstream double: ``proxy.standin.StandIn`` with latency 0;
- vlcache: ``vlcache serve --upstream <double>``, once at ``--log-level WARNING`` and once at
  ``INFO`` (the default, one log line per request), each with a fresh data directory;
- the floor: a trivial aiohttp server that reads the whole body and answers a fixed small JSON,
  what any Python proxy stands on.

Every request carries the same ~150 KB photo-like JPEG as a base64 data URI in an OpenAI chat
request (``Authorization: Bearer bench``). After one priming request every request to vlcache with
that body is an exact hit (checked on every 1-client request through ``X-Cache: HIT``, and through
the double's POST count, which must not move during the hit phases). The miss path sends a
different question text per request, so every request is a MISS that goes upstream.

Load comes from ``wrk`` (installed with apt-get if missing) driving a generated Lua script:
latency with 1 connection (``-t1 -c1``, a fixed number of sequential requests after a warm-up;
each request timed inside wrk's LuaJIT with CLOCK_MONOTONIC from just before its write to its
complete answer, no Python client overhead; wrk's own histogram is not used there because it
"corrects" for coordinated omission, which turns one long stall into dozens of phantom samples),
throughput with 32 connections on one wrk thread. The load generator shares the machine's cores
with the server under test, the same way for vlcache and for the floor, so their ratio is fair.

Then (unless ``--no-profile``) py-spy samples the WARNING vlcache process under the 32-client hit
load and under the 1-client miss load; the summary lands in ``bench/RESULTS.md`` with the figures.

Other processes on the machine skew every figure (two cores): the run waits up to
``--quiet-wait`` seconds for them to calm down and reports the CPU they took during each run.
``--tree DIR`` measures another source tree (e.g. a ``git worktree`` of an older commit) with the
same harness, to compare two versions.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

TITLE = "Exact-hit path (issue 2)"
CHAT_PATH = "/v1/chat/completions"
MARKER = "@@QUESTION@@"
DATA_URI_HEAD = "data:image/jpeg;base64,"
TARGET_JPEG_BYTES = 150 * 1024

# The targets; none of them is bent here.
HIT_P50_MS = 1.0
HIT_P99_MS = 3.0
MISS_OVERHEAD_P50_MS = 1.0
HITS_PER_S = 2000.0
FLOOR_SHARE = 0.5

STALL_US = 20_000  # a 1-client request slower than this counts as a stall


# --- workload ---------------------------------------------------------------------------------


def photo_jpeg(target_bytes: int = TARGET_JPEG_BYTES) -> tuple[bytes, int]:
    """A photo-like 900x700 JPEG (gradients, soft blobs, grain) near ``target_bytes``; quality."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(7)
    height, width = 700, 900
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack(
        [x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 160 + 60], -1
    )
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(40, 200)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        pixels += rng.uniform(-80, 80, 3) * blob
    grain = rng.normal(0, 1, (height, width, 3)).astype(np.float32) * 127 + 128
    soft = Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(1.2)
    )
    pixels += (np.asarray(soft, np.float32) - 128) * 0.6 + rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    def encode(quality: int) -> bytes:
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        return out.getvalue()

    best = min(range(40, 96), key=lambda q: abs(len(encode(q)) - target_bytes))
    return encode(best), best


@dataclass(frozen=True)
class Workload:
    """The request bodies on disk, as wrk reads them."""

    fixed: c.Body
    varying: c.Body  # the same photo, a new question every request
    new_photo: c.Body  # the same question, a new picture every request
    body: bytes
    jpeg_bytes: int
    jpeg_quality: int


def make_workload(work_dir: Path) -> Workload:
    """Write the fixed body and the prefixes/suffixes of the varying ones."""
    jpeg, quality = photo_jpeg()
    data_uri = DATA_URI_HEAD + base64.b64encode(jpeg).decode()
    request = {
        "model": "qwen3-vl-8b-instruct",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri}},
                    {"type": "text", "text": f"What is in this photo? {MARKER}"},
                ],
            }
        ],
        "max_tokens": 128,
    }
    text = json.dumps(request)
    prefix, suffix = text.split(MARKER)
    body = (prefix + "fixed" + suffix).encode()
    # A new picture per request: the photo with a 12-byte JPEG comment (COM) segment right after
    # its start-of-image marker. Those 12 bytes are base64 characters 8-23 of the data URI's
    # payload, which wrk replaces with 16 digits per request: a valid JPEG each time, another
    # SHA-256, the same pixels.
    commented = base64.b64encode(jpeg[:2] + b"\xff\xfe\x00\x0e" + bytes(12) + jpeg[2:]).decode()
    fixed_text = json.dumps(request).replace(MARKER, "fixed")
    photo_prefix, photo_suffix = fixed_text.replace(
        data_uri, DATA_URI_HEAD + commented[:8] + MARKER + commented[24:]
    ).split(MARKER)
    texts = {"prefix": prefix, "suffix": suffix, "photo-prefix": photo_prefix}
    texts["photo-suffix"] = photo_suffix
    paths = {name: work_dir / f"{name}.json" for name in ("body", *texts)}
    paths["body"].write_bytes(body)
    for name, value in texts.items():
        paths[name].write_text(value)
    return Workload(
        fixed=c.Body(path=paths["body"]),
        varying=c.Body(prefix=paths["prefix"], suffix=paths["suffix"]),
        new_photo=c.Body(prefix=paths["photo-prefix"], suffix=paths["photo-suffix"], digits=True),
        body=body,
        jpeg_bytes=len(jpeg),
        jpeg_quality=quality,
    )


# --- measurements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One wrk run, with the CPU the server, all our servers and the machine spent during it."""

    run: c.WrkRun
    wall_s: float
    server_cpu_s: float
    ours_cpu_s: float
    machine_cpu_s: float
    stalls: int = 0

    @property
    def server_cores(self) -> float:
        """Cores the server under test used on average (over the whole wrk process's life)."""
        return self.server_cpu_s / self.wall_s

    @property
    def cpu_us_per_request(self) -> float:
        """Server CPU time per completed request."""
        return self.server_cpu_s / max(self.run.requests, 1) * 1e6

    @property
    def other_cores(self) -> float:
        """Cores busy with neither our servers nor wrk: other people's processes (noise)."""
        spent = self.machine_cpu_s - self.ours_cpu_s - self.run.loadgen_cpu_s
        return max(spent, 0.0) / self.wall_s


class Bench:
    """Runs the wrk phases against the servers, checking every run for errors."""

    def __init__(
        self, args: argparse.Namespace, work_dir: Path, workload: Workload, procs: c.Processes
    ) -> None:
        self.args = args
        self.work_dir = work_dir
        self.workload = workload
        self.procs = procs
        self._runs = 0

    def script(
        self, body: c.Body, *, limit: int = 0, expect: str | None = None, raw: Path | None = None
    ) -> Path:
        """A fresh wrk script for ``body``."""
        self._runs += 1
        name = f"run{self._runs:02d}"
        return c.write_lua(
            self.work_dir,
            name,
            body,
            path=CHAT_PATH,
            limit=limit,
            expect_cache=expect,
            run=self._runs,
            raw_path=raw,
        )

    def measure(
        self, server: c.Server, script: Path, *, connections: int, seconds: float
    ) -> Measured:
        """One wrk run against ``server`` with the CPU accounting around it."""
        clock = time.perf_counter
        before = (clock(), server.cpu_seconds(), self.procs.cpu_seconds(), c.machine_busy_seconds())
        run = c.run_wrk(server.url, script, connections=connections, seconds=seconds)
        after = (clock(), server.cpu_seconds(), self.procs.cpu_seconds(), c.machine_busy_seconds())
        server.check_alive()
        _check(run, server.name)
        return Measured(run, *(a - b for a, b in zip(after, before, strict=True)))

    def latency(self, server: c.Server, body: c.Body, expect: str | None = None) -> Measured:
        """1 client: a warm-up, then ``--requests`` sequential requests."""
        args = self.args
        warm = self.script(body, limit=args.warmup, expect=expect)
        c.run_wrk(server.url, warm, connections=1, seconds=60)
        raw = self.work_dir / f"times{self._runs + 1:02d}"
        script = self.script(body, limit=args.requests, expect=expect, raw=raw)
        measured = self.measure(server, script, connections=1, seconds=120)
        run = measured.run
        if expect is not None and run.matched != run.requests:
            raise RuntimeError(
                f"{server.name}: only {run.matched} of {run.requests} answers had X-Cache: {expect}"
            )
        # Percentiles of what the sequential client saw, not wrk's corrected histogram.
        times = sorted(c.read_times(raw))
        if len(times) != args.requests:
            raise RuntimeError(f"{server.name}: {len(times)} request times, not {args.requests}")
        exact = dataclasses.replace(
            run,
            mean_us=sum(times) / len(times),
            p50_us=c.percentile(times, 50),
            p90_us=c.percentile(times, 90),
            p99_us=c.percentile(times, 99),
            p999_us=c.percentile(times, 99.9),
            max_us=times[-1],
        )
        stalls = sum(t > STALL_US for t in times)
        return dataclasses.replace(measured, run=exact, stalls=stalls)

    def throughput(self, server: c.Server, body: c.Body) -> Measured:
        """``--connections`` clients for ``--seconds`` after a 2 s warm-up."""
        args = self.args
        script = self.script(body)
        c.run_wrk(server.url, script, connections=args.connections, seconds=2)
        return self.measure(server, script, connections=args.connections, seconds=args.seconds)


def _check(run: c.WrkRun, what: str) -> None:
    if run.requests == 0 or run.failed:
        raise RuntimeError(f"{what}: {run.requests} requests, errors {run.errors}")


def prime(server: c.Server, upstream: c.Server, body: bytes) -> None:
    """Send the fixed body twice: a MISS that reaches the upstream once, then a HIT."""
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
    before = c.upstream_posts(upstream.port)
    for expected in ("MISS", "HIT"):
        status, response_headers, _ = c.http_request(server.port, "POST", CHAT_PATH, body, headers)
        cache = response_headers.get("X-Cache")
        if status != 200 or cache != expected:
            raise RuntimeError(
                f"{server.name}: priming expected 200 {expected}, got {status} X-Cache={cache}\n"
                f"{server.log_tail()}"
            )
    calls = c.upstream_posts(upstream.port) - before
    if calls != 1:
        raise RuntimeError(f"{server.name}: priming reached the upstream {calls} times, not 1")


@dataclass
class ProxyFigures:
    """What was measured of one vlcache process."""

    level: str
    hit: Measured
    miss: Measured
    miss_new_photo: Measured
    throughput: Measured
    upstream_calls_in_hit_phase: int


def measure_proxy(bench: Bench, server: c.Server, upstream: c.Server, level: str) -> ProxyFigures:
    """Prime, then hit latency and hit throughput (upstream count frozen), then miss latency."""
    prime(server, upstream, bench.workload.body)
    before = c.upstream_posts(upstream.port)
    with c.timed(f"vlcache {level}: hit latency, 1 client"):
        hit = bench.latency(server, bench.workload.fixed, expect="HIT")
    with c.timed(f"vlcache {level}: hit throughput, {bench.args.connections} clients"):
        throughput = bench.throughput(server, bench.workload.fixed)
    hit_calls = c.upstream_posts(upstream.port) - before
    with c.timed(f"vlcache {level}: miss latency, 1 client"):
        miss = bench.latency(server, bench.workload.varying, expect="MISS")
    with c.timed(f"vlcache {level}: miss latency with a new photo each time, 1 client"):
        new_photo = bench.latency(server, bench.workload.new_photo, expect="MISS")
    return ProxyFigures(level, hit, miss, new_photo, throughput, hit_calls)


@dataclass(frozen=True)
class Profiled:
    """A py-spy recording of vlcache under one load, and what the load measured meanwhile."""

    label: str
    profile: c.Profile
    seconds: int
    requests_per_s: float
    server_cores: float

    @property
    def gil_busy(self) -> float:
        """Share of the sampling time some thread held the GIL."""
        return self.profile.samples / (c.PROFILE_RATE * self.seconds)

    def per_request_us(self, samples: int) -> float:
        """GIL time per request that ``samples`` of this profile stand for."""
        return samples / c.PROFILE_RATE / self.seconds / max(self.requests_per_s, 1e-9) * 1e6


def profile_load(
    bench: Bench, server: c.Server, body: c.Body, connections: int, seconds: int, label: str
) -> Profiled:
    """py-spy samples ``server`` for ``seconds`` while wrk keeps it loaded with ``body``."""
    output = bench.work_dir / f"profile-{label}.collapsed"
    load = c.start_wrk(server.url, bench.script(body), connections=connections, seconds=seconds + 3)
    try:
        time.sleep(1.0)
        cpu_before, started = server.cpu_seconds(), time.perf_counter()
        c.record_profile(server.pid, seconds, output)
        cores = (server.cpu_seconds() - cpu_before) / (time.perf_counter() - started)
    finally:
        run = c.finish_wrk(load, seconds + 60)
    server.check_alive()
    _check(run, f"{server.name} under py-spy")
    bench.args.profile_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(output, bench.args.profile_dir / f"vlcache-exact-hit-{label}.collapsed")
    return Profiled(label, c.read_profile(output), seconds, run.rate, cores)


# --- report -------------------------------------------------------------------------------------


def ms(us: float) -> str:
    """Microseconds as milliseconds with 2 decimals."""
    return f"{us / 1000:.2f}"


def latency_table(
    rows: list[tuple[str, Measured]], direct: Measured, proxies: list[ProxyFigures]
) -> str:
    """1-client percentiles per path, then the miss path minus the direct path."""
    lines = [
        "| 1 client, sequential | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | mean ms "
        f"| requests > {STALL_US // 1000} ms | server CPU µs/req | other CPU cores | requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m in rows:
        run = m.run
        lines.append(
            f"| {label} | {ms(run.p50_us)} | {ms(run.p90_us)} | {ms(run.p99_us)} "
            f"| {ms(run.p999_us)} | {ms(run.max_us)} | {ms(run.mean_us)} | {m.stalls} "
            f"| {m.cpu_us_per_request:,.0f} | {m.other_cores:.2f} | {run.requests} |"
        )
    d = direct.run
    for p in proxies:
        for what, miss in (("", p.miss.run), (", new photo", p.miss_new_photo.run)):
            lines.append(
                f"| miss-path overhead over direct ({p.level}{what}) "
                f"| {ms(miss.p50_us - d.p50_us)} | {ms(miss.p90_us - d.p90_us)} "
                f"| {ms(miss.p99_us - d.p99_us)} | {ms(miss.p999_us - d.p999_us)} "
                f"| | {ms(miss.mean_us - d.mean_us)} | | | | |"
            )
    return "\n".join(lines)


def throughput_table(rows: list[tuple[str, Measured]], floor: Measured, connections: int) -> str:
    """Requests per second per server, against the floor, with the CPU each used."""
    lines = [
        f"| {connections} clients | req/s | vs floor | p50 ms | p99 ms | server CPU cores "
        "| server CPU µs/req | wrk CPU cores | other CPU cores | requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, t in rows:
        run = t.run
        lines.append(
            f"| {label} | {run.rate:,.0f} | {run.rate / floor.run.rate:.0%} | {ms(run.p50_us)} "
            f"| {ms(run.p99_us)} | {t.server_cores:.2f} | {t.cpu_us_per_request:,.0f} "
            f"| {run.loadgen_cpu_s / t.wall_s:.2f} | {t.other_cores:.2f} | {run.requests:,} |"
        )
    return "\n".join(lines)


def targets_table(proxies: list[ProxyFigures], direct: Measured, floor: Measured) -> str:
    """The issue's targets, PASS or FAIL per vlcache log level."""
    d = direct.run
    lines = ["| target | " + " | ".join(f"vlcache {p.level}" for p in proxies) + " |"]
    lines.append("|---|" + "---|" * len(proxies))

    def row(label: str, cells: list[tuple[str, bool]]) -> None:
        lines.append(
            f"| {label} | " + " | ".join(f"{text} **{c.verdict(ok)}**" for text, ok in cells) + " |"
        )

    row(
        f"hit p50 <= {HIT_P50_MS:g} ms",
        [(f"{ms(p.hit.run.p50_us)} ms", p.hit.run.p50_us <= HIT_P50_MS * 1000) for p in proxies],
    )
    row(
        f"hit p99 <= {HIT_P99_MS:g} ms",
        [(f"{ms(p.hit.run.p99_us)} ms", p.hit.run.p99_us <= HIT_P99_MS * 1000) for p in proxies],
    )
    row(
        f"miss-path overhead p50 <= {MISS_OVERHEAD_P50_MS:g} ms",
        [
            (
                f"{ms(p.miss.run.p50_us - d.p50_us)} ms",
                p.miss.run.p50_us - d.p50_us <= MISS_OVERHEAD_P50_MS * 1000,
            )
            for p in proxies
        ],
    )
    row(
        f"the same, a new photo each miss (not the issue's workload) p50 <= "
        f"{MISS_OVERHEAD_P50_MS:g} ms",
        [
            (
                f"{ms(p.miss_new_photo.run.p50_us - d.p50_us)} ms",
                p.miss_new_photo.run.p50_us - d.p50_us <= MISS_OVERHEAD_P50_MS * 1000,
            )
            for p in proxies
        ],
    )
    row(
        f">= {HITS_PER_S:,.0f} hits/s at 32 clients",
        [(f"{p.throughput.run.rate:,.0f}/s", p.throughput.run.rate >= HITS_PER_S) for p in proxies],
    )
    row(
        f">= {FLOOR_SHARE:.0%} of the floor's req/s",
        [
            (
                f"{p.throughput.run.rate / floor.run.rate:.0%}",
                p.throughput.run.rate >= FLOOR_SHARE * floor.run.rate,
            )
            for p in proxies
        ],
    )
    return "\n".join(lines)


# Leaf to root, the first frame containing one of these names the stage of a sample.
_STAGES = (
    ("decode_data_uri", "base64 decode of the image (`decode_data_uri`)"),
    ("image_digest", "sha256 of the image (`image_digest`)"),
    ("parse_chat", "JSON parse + message walk (`parse_chat`, orjson)"),
    ("question_fingerprint", "question fingerprint"),
    ("namespace_for", "namespace + exact key"),
    ("exact_key (embeddings", "namespace + exact key"),
    ("find_exact", "exact lookup (`find_exact`: memory, then SQL)"),
    ("_write_forever", "store writer task (inserts, counters)"),
    ("_store_answer", "storing the answer (`_store_answer`)"),
    ("Upstream.", "upstream request (aiohttp client)"),
    ("record (store", "hit counters (`CacheStore.record`)"),
    ("(logging/", "logging"),
    ("_serve_hit", "building the hit response (`_serve_hit`)"),
    ("run_in_executor", "executor hand-off"),
    ("Future.set_result", "executor hand-off"),
    ("_read_from_self", "executor hand-off"),
    ("_read_body", "joining the body (`request.read`)"),
    ("data_received", "aiohttp: HTTP parsing, body buffering"),
    ("finish_response", "aiohttp: writing the response"),
    ("_handle_request", "aiohttp: request handling, routing"),
    ("start (aiohttp/web_protocol", "aiohttp: request handling, routing"),
    ("_worker (futures", "executor threads, other"),
    ("_connection_worker_thread", "aiosqlite thread"),
)

# Only for stacks where none of the above appears: SQLAlchemy's async layer runs its work in
# greenlets, and some sampled greenlet stacks stop at the greenlet, so whether they were the
# lookup's SELECT or the writer's INSERTs/UPDATEs is lost.
_FALLBACK_STAGES = (
    ("(sql/", "SQLAlchemy in a greenlet, caller cut off (lookup or writer)"),
    ("(engine/", "SQLAlchemy in a greenlet, caller cut off (lookup or writer)"),
    ("(util/", "SQLAlchemy in a greenlet, caller cut off (lookup or writer)"),
    ("(aiosqlite/", "aiosqlite hand-off, caller cut off"),
    ("_run_once", "event loop (select, scheduling)"),
)


def stage(frames: tuple[str, ...]) -> str:
    """The stage one sampled stack belongs to (the innermost frame that names one)."""
    if not frames:
        return "no Python frame (C code holding the GIL)"
    for stages in (_STAGES, _FALLBACK_STAGES):
        for frame in reversed(frames):
            for needle, label in stages:
                if needle in frame:
                    return label
    return "other"


def profile_section(profiles: list[Profiled], profile_dir: Path, level: str, top: int = 10) -> str:
    """Markdown: GIL time per stage (share and µs per request), then top functions."""
    stages = [Counter(stage(f) for f in p.profile.stacks.elements()) for p in profiles]
    order = sorted(
        {name for counts in stages for name in counts},
        key=lambda name: (
            -max(
                counts[name] / max(p.profile.samples, 1)
                for counts, p in zip(stages, profiles, strict=True)
            )
        ),
    )
    lines = [
        f"The {level} vlcache process under py-spy, {c.PROFILE_RATE} Hz `--gil` (only the "
        "thread holding the GIL is sampled, so idle threads drop out; C code that releases "
        "the GIL, like hashlib on big buffers and socket calls, is not seen). Self time of C "
        "functions (orjson, binascii) is in their Python caller. Collapsed stacks: "
        + ", ".join(f"`{profile_dir / f'vlcache-exact-hit-{p.label}.collapsed'}`" for p in profiles)
        + " (outside the repo; speedscope reads them).",
        "",
        "| | " + " | ".join(p.label for p in profiles) + " |",
        "|---|" + "---:|" * len(profiles),
        "| requests/s while sampled | "
        + " | ".join(f"{p.requests_per_s:,.0f}" for p in profiles)
        + " |",
        "| vlcache CPU, cores | " + " | ".join(f"{p.server_cores:.2f}" for p in profiles) + " |",
        "| GIL held, share of time | " + " | ".join(f"{p.gil_busy:.0%}" for p in profiles) + " |",
        "| GIL time per request | "
        + " | ".join(f"{p.per_request_us(p.profile.samples):,.0f} µs" for p in profiles)
        + " |",
    ]
    kinds = sorted({k for p in profiles for k in p.profile.by_thread})
    for kind in kinds:
        cells = [f"{p.profile.by_thread[kind] / max(p.profile.samples, 1):.0%}" for p in profiles]
        lines.append(f"| GIL time in {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| stage (GIL time) | " + " | ".join(f"{p.label}: share | µs/req" for p in profiles) + " |",
        "|---|" + "---:|---:|" * len(profiles),
    ]
    for name in order:
        cells = []
        for counts, p in zip(stages, profiles, strict=True):
            n = counts[name]
            cells.append(f"{n / max(p.profile.samples, 1):.1%} | {p.per_request_us(n):,.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for p in profiles:
        total = max(p.profile.samples, 1)
        lines += ["", f"Top {top} functions by self time, {p.label}:", ""]
        lines += ["| function | self | inclusive |", "|---|---:|---:|"]
        for name, n in p.profile.self_time.most_common(top):
            share = p.profile.total_time[name] / total
            lines.append(f"| `{name}` | {n / total:.1%} | {share:.1%} |")
    return "\n".join(lines)


def noise_warning(runs: list[Measured]) -> list[str]:
    """A warning paragraph when other processes took a noticeable share of the CPUs."""
    worst = max(m.other_cores for m in runs)
    if worst < 0.25:
        return []
    return [
        "",
        f"**Noisy run**: other processes took up to {worst:.2f} cores during the measurements "
        "(see the `other CPU cores` columns); latencies and rates are pessimistic, the CPU "
        "µs per request are the steadiest figures.",
    ]


def report(
    args: argparse.Namespace,
    serve_args: list[str],
    workload: Workload,
    facts: dict[str, str],
    background: float,
    direct_latency: Measured,
    floor_latency: Measured,
    proxies: list[ProxyFigures],
    direct_tp: Measured,
    floor_tp: Measured,
    profile_text: str | None,
    started: float,
) -> str:
    """The markdown section: command, date, machine, tables."""
    lat_rows = [("floor server", floor_latency), ("upstream double, direct", direct_latency)]
    for p in proxies:
        lat_rows += [
            (f"vlcache hit ({p.level})", p.hit),
            (f"vlcache miss ({p.level})", p.miss),
            (f"vlcache miss, new photo ({p.level})", p.miss_new_photo),
        ]
    tp_rows = [("floor server", floor_tp), ("upstream double, direct", direct_tp)]
    tp_rows += [(f"vlcache hit ({p.level})", p.throughput) for p in proxies]
    hit_calls = ", ".join(f"{p.level}: {p.upstream_calls_in_hit_phase}" for p in proxies)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"Command: `{shlex.join([sys.executable, *sys.argv])}` (repo root), {now}, "
        f"{time.perf_counter() - started:.0f} s in all. Code measured: "
        f"{args.tree_label or c.describe_source(args.tree)}, run as `vlcache serve --upstream "
        f"<double> --port <p> --data-dir <fresh tmp> --log-level <level>"
        f"{''.join(' ' + shlex.quote(a) for a in serve_args)}`.",
        "",
        f"Machine: {facts['nproc']} cores ({facts['cpu']}), Linux {facts['kernel']}, "
        f"Python {facts['python']}, aiohttp {facts['aiohttp']}, wrk {facts['wrk']}. "
        f"Other processes kept {background:.2f} cores busy at the start; the `other CPU cores` "
        "columns show what they took during each run (noise: the figures are only clean where "
        "it is near 0).",
        *noise_warning(
            [floor_latency, direct_latency, floor_tp, direct_tp]
            + [m for p in proxies for m in (p.hit, p.miss, p.miss_new_photo, p.throughput)]
        ),
        "",
        f"Workload: one {workload.jpeg_bytes / 1024:.0f} KB JPEG (900x700, quality "
        f"{workload.jpeg_quality}) as a base64 data URI in an OpenAI chat request "
        f"({len(workload.body) / 1024:.0f} KB body). Hits and the direct and floor rows send the "
        "same body every request; `miss` rows the same photo with a new question each time "
        "(the issue's workload: a miss whose picture was seen before, as in every later turn of "
        "a conversation about it); `miss, new photo` rows the same question with a new picture "
        "each time (16 base64 digits in a JPEG comment segment). Latency: wrk "
        f"`-t1 -c1`, {args.warmup} warm-up then {args.requests} sequential requests, each "
        "timed in wrk's Lua with CLOCK_MONOTONIC from its write to the last byte of its answer "
        "(not wrk's histogram: its coordinated-omission correction turns one 100 ms stall into "
        "~60 phantom samples). Throughput: wrk `-t1 "
        f"-c{args.connections}`, 2 s warm-up then {args.seconds:g} s; wrk shares the "
        f"{facts['nproc']} cores with the server. Every 1-client hit answer carried "
        f"`X-Cache: HIT`, every miss `X-Cache: MISS`; upstream POSTs during the hit phases "
        f"(after the one priming miss): {hit_calls}.",
        "",
        "### Targets",
        "",
        targets_table(proxies, direct_latency, floor_tp),
        "",
        "### Latency",
        "",
        latency_table(lat_rows, direct_latency, proxies),
        "",
        "### Throughput",
        "",
        throughput_table(tp_rows, floor_tp, args.connections),
    ]
    if profile_text:
        parts += ["", "### Where the time goes", "", profile_text]
    return "\n".join(parts)


# --- main ---------------------------------------------------------------------------------------


def extra_serve_args(given: str, vlcache: str, tree: Path) -> list[str]:
    """``--serve-args`` as a list; ``auto`` turns the semantic tier off where it exists."""
    if given != "auto":
        return shlex.split(given)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH", "")])),
    )
    usage = subprocess.run(
        [vlcache, "serve", "--help"], capture_output=True, text=True, cwd=tree, env=env, check=False
    ).stdout
    args = ["--embedder", "none"] if "--embedder" in usage else []
    if "--admin-port" in usage:
        args += ["--admin-port", "0"]  # each vlcache measured gets its own (unused) admin port
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every phase, print the tables and write them to bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="1-client measured requests")
    parser.add_argument("--warmup", type=int, default=200, help="1-client warm-up requests")
    parser.add_argument("--connections", type=int, default=32, help="clients of throughput runs")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of throughput runs")
    parser.add_argument("--profile-seconds", type=int, default=8, help="py-spy sampling time")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where to keep py-spy's collapsed stacks (default: the temp directory)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy phase")
    parser.add_argument(
        "--tree",
        type=Path,
        default=c.REPO_ROOT,
        help="source tree to run vlcache and the stand-in from (default: this checkout); "
        "e.g. a `git worktree` of another commit, to compare two",
    )
    parser.add_argument(
        "--tree-label", default="", help="how RESULTS.md names --tree (default: its git commit)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait at start for other processes to leave the CPUs alone",
    )
    parser.add_argument(
        "--levels",
        default="WARNING,INFO",
        help="vlcache log levels to measure, comma-separated (default: WARNING,INFO)",
    )
    parser.add_argument(
        "--serve-args",
        default="auto",
        help="extra arguments of `vlcache serve`, one string; `auto` (default): "
        "`--embedder none` where the tree has that flag (the exact tier alone, no model weights)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    c.ensure_wrk()
    profiling = not args.no_profile
    if profiling and shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None:
        print("bench: py-spy not installed in this venv: no profile", file=sys.stderr)
        profiling = False
    vlcache = c.tool("vlcache")
    serve_args = extra_serve_args(args.serve_args, vlcache, args.tree.resolve())
    background = c.wait_for_quiet(0.25, args.quiet_wait)
    with (
        tempfile.TemporaryDirectory(prefix="vlcache-bench-") as tmp,
        c.Processes(Path(tmp), args.tree.resolve()) as procs,
    ):
        work_dir = Path(tmp)
        workload = make_workload(work_dir)
        bench = Bench(args, work_dir, workload, procs)

        up_port, floor_port = c.free_port(), c.free_port()
        upstream = procs.start(
            "upstream", c.python_runner("serve_standin", up_port), up_port, ready_path=c.CALLS_PATH
        )
        floor = procs.start("floor", c.python_runner("serve_floor", floor_port), floor_port)

        def start_vlcache(level: str) -> c.Server:
            port = c.free_port()
            argv = [
                vlcache, "serve", "--upstream", upstream.url, "--port", str(port),
                "--data-dir", str(work_dir / f"data-{level.lower()}"), "--log-level", level,
                *serve_args,
            ]  # fmt: skip
            return procs.start(f"vlcache-{level.lower()}", argv, port, ready_path="/v1/models")

        with c.timed("direct and floor latency, 1 client"):
            direct_latency = bench.latency(upstream, workload.fixed)
            floor_latency = bench.latency(floor, workload.fixed)
        with c.timed(f"direct and floor throughput, {args.connections} clients"):
            direct_tp = bench.throughput(upstream, workload.fixed)
            floor_tp = bench.throughput(floor, workload.fixed)

        proxies, servers = [], []
        for level in [lv.strip().upper() for lv in args.levels.split(",") if lv.strip()]:
            servers.append(start_vlcache(level))
            proxies.append(measure_proxy(bench, servers[-1], upstream, level))
        profile_text = None
        if profiling and servers:
            # Last, so the measurements above are done sooner (less exposed to other load).
            server, level = servers[0], proxies[0].level
            with c.timed(f"profiling vlcache {level}: hits at 32 clients, misses at 1"):
                profiles = [
                    profile_load(
                        bench, server, workload.fixed, args.connections,
                        args.profile_seconds, f"hit-{args.connections}-clients",
                    ),
                    profile_load(
                        bench, server, workload.varying, 1, args.profile_seconds,
                        "miss-1-client",
                    ),
                ]  # fmt: skip
            profile_text = profile_section(profiles, args.profile_dir, level)

        text = report(
            args, serve_args, workload, c.machine_facts(), background, direct_latency,
            floor_latency, proxies, direct_tp, floor_tp, profile_text, started,
        )  # fmt: skip
    c.publish(TITLE, text, write=not args.no_write)


if __name__ == "__main__":
    main()
