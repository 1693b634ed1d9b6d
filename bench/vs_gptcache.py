"""vlcache against GPTCache on the same workload, in one run (issue 6, item 4).

Run from the repo root: ``.venv/bin/python bench/vs_gptcache.py`` (about 6 minutes on 2
cores; ``--quick``: a smoke run of about 2 minutes that leaves ``bench/RESULTS.md`` alone).

GPTCache is not a dependency of vlcache: this script checks at start that the PyPI package
``gptcache`` is installed and, if not, installs the tested version (``GPTCACHE_VERSION``) into the
running interpreter's environment with pip; the versions used go into the results. The quality
phase needs the real-photo set (``python -m bench.quality.dataset``; ``--no-quality`` skips it).

Every server runs in its own process on 127.0.0.1, in front of one upstream double
(``proxy.standin.StandIn``, latency 0):

- vlcache: ``vlcache serve --embedder efficientnet-lite0 --embed-precision fp32
  --embed-runtime R --embed-threads T`` (threshold: the embedder's default cosine 0.70);
- GPTCache: ``bench/gptcache_server.py`` (its docstring says how it is wired: GPTCache's own
  ``Cache`` with a SQLite + FAISS data manager, the same embedder on the same decoded picture, a
  search-distance evaluation at the equivalent threshold, the same runtime R and threads T), in two
  configurations: the similar cache alone, as GPTCache's documentation sets one up ("GPTCache"),
  and with an exact L1 cache chained in front through ``next_cache`` ("GPTCache + L1");
- the double itself, called directly, and ``_common.serve_floor`` (a trivial aiohttp server that
  reads the body and answers a fixed JSON): the baselines.

The load comes from ``wrk`` in another process (``wrk_cycle.py``: a Lua script cycling through
request bodies, each an OpenAI chat request with a base64 JPEG, every 1-client request timed in
LuaJIT as ``exact_hit.py`` does). The workload: a ~150 KB 900x700 photo-like JPEG stored once
(one MISS per cache), then

1. hit latency, 1 client: the same body again and again (exact repeat), and distinct
   re-encodings of the photo (other JPEG quality / chroma subsampling: near-duplicates, so
   semantic hits); answers are counted by their ``X-Cache`` / ``X-Cache-Match``. The *hit-path
   overhead* is a hit's latency minus the floor server's for the same bodies (what the cache
   adds to the HTTP exchange of the same request), at p50 and p99; the issue's target is
   vlcache's p50 at most half of GPTCache's, in the same run;
2. hit throughput at ``--connections`` clients for ``--seconds`` (hits/s counts only answers of
   the expected kind: vlcache's coalesced or fallen-back answers do not count);
3. quality on the real-photo set (``vs_gptcache_quality.py``): store originals, ask their benign
   edits (should hit), text/digit edits, look-alikes and distinct pictures (must not).

Other processes skew every figure (the machine is shared): the run waits up to ``--quiet-wait``
seconds for them before each timed phase and reports the CPU they took during each run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import _common as c  # noqa: E402
import vs_gptcache_quality as quality  # noqa: E402
import vs_gptcache_report as report  # noqa: E402
from exact_hit import Measured, photo_jpeg  # noqa: E402
from wrk_cycle import CHAT_PATH, Expect, Runner  # noqa: E402

TITLE = "vlcache vs GPTCache (issue 6)"
GPTCACHE_VERSION = "0.1.44"
QUESTION = "What is in this photo, and what does it cost?"
SEMANTIC = Expect("HIT", "semantic")
# --levels of gptcache_server.py -> (label, what its exact repeats carry)
GPTCACHE_CONFIGS = {1: ("GPTCache", SEMANTIC), 2: ("GPTCache + L1", Expect("HIT", "exact"))}
SERVER = BENCH_DIR / "gptcache_server.py"
DEFAULT_QUALITY = Path("~/.cache/vlcache-bench/quality").expanduser()


# --- GPTCache itself ---------------------------------------------------------------------------


def ensure_gptcache() -> str:
    """The installed gptcache version; installs ``GPTCACHE_VERSION`` with pip when missing."""
    try:
        return importlib.metadata.version("gptcache")
    except importlib.metadata.PackageNotFoundError:
        pass
    print(f"bench: installing gptcache=={GPTCACHE_VERSION} with pip ...", file=sys.stderr)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", f"gptcache=={GPTCACHE_VERSION}"], check=True
    )
    return importlib.metadata.version("gptcache")


def versions() -> dict[str, str]:
    """Versions of the packages either cache stands on."""
    names = ("gptcache", "cachetools", "requests", "faiss-cpu", "SQLAlchemy", "torch", "timm")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


# --- workload -----------------------------------------------------------------------------------


def re_encodings(photo: bytes, count: int) -> list[bytes]:
    """``count`` distinct re-encodings of ``photo`` (JPEG quality 95 down x chroma subsampling)."""
    from PIL import Image

    image = Image.open(io.BytesIO(photo))
    image.load()
    seen, out = {photo}, []
    for q in range(95, 40, -1):
        for subsampling in (2, 0, 1):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=q, subsampling=subsampling)
            data = buffer.getvalue()
            if data not in seen:
                seen.add(data)
                out.append(data)
            if len(out) == count:
                return out
    raise RuntimeError(f"only {len(out)} distinct re-encodings")


def chat_body(jpeg: bytes) -> bytes:
    """An OpenAI chat request asking ``QUESTION`` about ``jpeg``."""
    import base64

    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    parts = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": QUESTION}]
    doc = {
        "model": "qwen3-vl-8b-instruct",
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 128,
    }
    return json.dumps(doc).encode()


@dataclass(frozen=True)
class Workload:
    """Request bodies on disk: the stored photo's, and near-duplicates of it."""

    exact: list[Path]
    copies: list[Path]
    body: bytes
    jpeg_bytes: int
    jpeg_quality: int


def make_workload(work_dir: Path, copies: int) -> Workload:
    """Write the exact body and one body per re-encoded copy."""
    photo, quality_setting = photo_jpeg()
    body = chat_body(photo)
    exact = work_dir / "exact.json"
    exact.write_bytes(body)
    paths = []
    for n, copy in enumerate(re_encodings(photo, copies)):
        path = work_dir / f"copy{n:03d}.json"
        path.write_bytes(chat_body(copy))
        paths.append(path)
    return Workload([exact], paths, body, len(photo), quality_setting)


# --- the caches ---------------------------------------------------------------------------------


@dataclass
class Cache:
    """One cache under test: its server, what its hits must carry, and what it measured."""

    label: str
    server: c.Server
    exact_expect: Expect
    latency: dict[str, Measured] = field(default_factory=dict)
    throughput: dict[str, Measured] = field(default_factory=dict)
    upstream_calls: int = 0
    hit_phase_calls: int = 0

    def expect(self, kind: str) -> Expect:
        """What a hit of ``kind`` ("exact" or "semantic") must carry from this cache."""
        return self.exact_expect if kind == "exact" else SEMANTIC


def post(server: c.Server, body: bytes, directive: str = "") -> tuple[int, str, str]:
    """Status, X-Cache and X-Cache-Match of one chat request."""
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
    if directive:
        headers["Cache-Control"] = directive
    status, got, _ = c.http_request(server.port, "POST", CHAT_PATH, body, headers, timeout=60)
    return status, got.get("X-Cache", ""), got.get("X-Cache-Match", "")


def prime(cache: Cache, workload: Workload, upstream: c.Server) -> None:
    """Store the photo (one MISS), then wait until a near-duplicate is a semantic hit."""
    before = c.upstream_posts(upstream.port)
    status, got, _ = post(cache.server, workload.body)
    if (status, got) != (200, "MISS"):
        raise RuntimeError(f"{cache.label}: priming answered {status} {got}")
    copy = workload.copies[0].read_bytes()
    deadline = time.monotonic() + 20
    while True:
        # no-store: a miss here must not store the copy (it would become an exact hit later).
        status, got, match = post(cache.server, copy, "no-store")
        if (status, got, match) == (200, "HIT", "semantic"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{cache.label}: near-duplicate still {status} {got} {match}")
        time.sleep(0.2)
    status, got, match = post(cache.server, workload.body)
    if (status, got, match) != (200, cache.exact_expect.cache, cache.exact_expect.match):
        raise RuntimeError(f"{cache.label}: exact repeat answered {status} {got} {match}")
    cache.upstream_calls = c.upstream_posts(upstream.port) - before


def start_caches(
    procs: c.Processes,
    args: argparse.Namespace,
    work_dir: Path,
    upstream: c.Server,
    *,
    levels: tuple[int, ...] = (1, 2),
    tag: str = "",
) -> list[Cache]:
    """vlcache and GPTCache servers (``levels``: 1 alone, 2 with L1), own processes, ready."""
    port = c.free_port()
    vlcache_argv = [
        c.tool("vlcache"), "serve", "--upstream", upstream.url, "--port", str(port),
        "--data-dir", str(work_dir / f"vlcache{tag}"), "--log-level", "WARNING",
        "--embedder", "efficientnet-lite0", "--embed-precision", "fp32",
        "--embed-runtime", args.runtime,
        "--embed-threads", str(args.torch_threads), "--admin-port", "0",
    ]  # fmt: skip
    server = procs.start(f"vlcache{tag}", vlcache_argv, port, ready_path="/v1/models", timeout=120)
    caches = [Cache("vlcache", server, Expect("HIT", "exact"))]
    for level in levels:
        label, expect = GPTCACHE_CONFIGS[level]
        port = c.free_port()
        argv = [
            sys.executable, str(SERVER), "--port", str(port), "--upstream", upstream.url,
            "--data-dir", str(work_dir / f"gptcache-{level}{tag}"), "--levels", str(level),
            "--torch-threads", str(args.torch_threads), "--workers", str(args.gptcache_workers),
            "--runtime", args.runtime,
        ]  # fmt: skip
        server = procs.start(f"gptcache-{level}{tag}", argv, port, ready_path="/_gptcache/ready")
        caches.append(Cache(label, server, expect))
    return caches


def measure_quality(
    procs: c.Processes, args: argparse.Namespace, work_dir: Path
) -> tuple[quality.QualitySet, list[quality.QualityResult]]:
    """The quality sequence through fresh vlcache and GPTCache processes on a paced double.

    The double answers after ``--quality-upstream-latency`` seconds here: vlcache embeds a
    miss's image beside the upstream call, and against a 0 ms double a client that stores
    originals back to back outruns that embedding (its batcher then sheds the work, and those
    entries are stored without vectors). A real model takes 800-1500 ms.
    """
    port = c.free_port()
    argv = c.python_runner("serve_standin", port, args.quality_upstream_latency)
    upstream = procs.start("upstream-paced", argv, port, ready_path=c.CALLS_PATH)
    qs = quality.build_set(args.quality_cache, args.quality_refs)
    results = []
    for cache in start_caches(procs, args, work_dir, upstream, levels=(1,), tag="-quality"):
        with c.timed(f"{cache.label}: quality sequence ({len(qs.queries)} queries)"):
            url = cache.server.url + CHAT_PATH
            results.append(quality.run_quality(cache.label, url, qs, args.quality_concurrency))
        procs.stop(cache.server)
    return qs, results


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags; ``--quick`` shrinks every phase and leaves RESULTS.md alone."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; RESULTS.md untouched")
    parser.add_argument("--exact-requests", type=int, default=400, help="1-client exact repeats")
    parser.add_argument("--semantic-requests", type=int, default=120, help="1-client near-dups")
    parser.add_argument("--warmup", type=int, default=10, help="1-client warm-up requests")
    parser.add_argument("--copies", type=int, default=80, help="near-duplicate bodies (> 4x -c)")
    parser.add_argument("--connections", type=int, default=16, help="clients of throughput runs")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of throughput runs")
    parser.add_argument("--torch-threads", type=int, default=1, help="both caches' embedder")
    parser.add_argument(
        "--runtime",
        choices=("onnx", "torch"),
        default="onnx",
        help="both caches' embedder runtime (onnx: what vlcache serve runs by default)",
    )
    parser.add_argument("--gptcache-workers", type=int, default=2, help="threads for get/put")
    parser.add_argument(
        "--quality-refs", type=int, default=100, help="references stored (0: half the set)"
    )
    parser.add_argument("--quality-concurrency", type=int, default=2, help="queries in flight")
    parser.add_argument(
        "--quality-upstream-latency", type=float, default=0.25, help="seconds, quality phase"
    )
    parser.add_argument("--quality-cache", type=Path, default=DEFAULT_QUALITY)
    parser.add_argument("--no-quality", action="store_true", help="skip the quality phase")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="max wait for a quiet CPU")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.exact_requests, args.semantic_requests, args.warmup = 60, 20, 3
        args.copies, args.seconds, args.quality_refs = 64, 3.0, 15
        args.quiet_wait = min(args.quiet_wait, 10.0)
        args.no_write = True
    return args


def measure_latency(
    runner: Runner,
    args: argparse.Namespace,
    caches: list[Cache],
    workload: Workload,
    servers: dict[str, c.Server],
) -> report.Baselines:
    """1-client latency of both hit kinds: the floor, the double, every cache."""
    bodies = {"exact": workload.exact, "semantic": workload.copies}
    counts = {"exact": args.exact_requests, "semantic": args.semantic_requests}
    base: report.Baselines = {}
    with c.timed("floor and double latency, 1 client"):
        for name in ("floor", "double"):
            base[name] = {
                kind: runner.latency(servers[name], bodies[kind], Expect(), counts[kind])
                for kind in bodies
            }
    upstream = servers["double"]
    for cache in caches:
        before = c.upstream_posts(upstream.port)
        with c.timed(f"{cache.label}: hit latency, 1 client"):
            for kind in bodies:
                expect = cache.expect(kind)
                # An exact repeat that takes the vector path costs a near-duplicate's time.
                count = counts["exact" if expect.match == "exact" else "semantic"]
                cache.latency[kind] = runner.latency(cache.server, bodies[kind], expect, count)
        cache.hit_phase_calls += c.upstream_posts(upstream.port) - before
    return base


def measure_throughput(
    runner: Runner, caches: list[Cache], workload: Workload, servers: dict[str, c.Server]
) -> dict[str, Measured]:
    """Hits/s of both kinds through every cache; the floor's and the double's own rates."""
    with c.timed(f"floor and double throughput, {runner.connections} clients"):
        base = {
            name: runner.throughput(servers[name], workload.exact, Expect())
            for name in ("floor", "double")
        }
    upstream = servers["double"]
    bodies = {"exact": workload.exact, "semantic": workload.copies}
    for cache in caches:
        before = c.upstream_posts(upstream.port)
        with c.timed(f"{cache.label}: hit throughput, {runner.connections} clients"):
            for kind in bodies:
                cache.throughput[kind] = runner.throughput(
                    cache.server, bodies[kind], cache.expect(kind)
                )
        cache.hit_phase_calls += c.upstream_posts(upstream.port) - before
    return base


def main(argv: list[str] | None = None) -> None:
    """Run every phase, print the tables and write them to bench/RESULTS.md."""
    args = parse_args(argv)
    started = time.perf_counter()
    c.ensure_wrk()
    print(f"bench: gptcache {ensure_gptcache()}", file=sys.stderr)
    if not args.no_quality and not (args.quality_cache / "manifest.json").exists():
        raise SystemExit(
            f"bench: no quality set at {args.quality_cache}: build it with "
            "`python -m bench.quality.dataset`, or pass --no-quality"
        )
    quiet = {"at the start": c.wait_for_quiet(report.QUIET_CORES, args.quiet_wait)}
    with (
        tempfile.TemporaryDirectory(prefix="vs-gptcache-") as tmp,
        c.Processes(Path(tmp)) as procs,
    ):
        work_dir = Path(tmp)
        workload = make_workload(work_dir, args.copies)
        runner = Runner(
            work_dir,
            procs,
            warmup=args.warmup,
            connections=args.connections,
            seconds=args.seconds,
        )
        up_port, floor_port = c.free_port(), c.free_port()
        servers = {
            "double": procs.start(
                "upstream",
                c.python_runner("serve_standin", up_port),
                up_port,
                ready_path=c.CALLS_PATH,
            ),
            "floor": procs.start("floor", c.python_runner("serve_floor", floor_port), floor_port),
        }
        with c.timed("starting vlcache and GPTCache (2 configurations)"):
            caches = start_caches(procs, args, work_dir, servers["double"])
            for cache in caches:
                prime(cache, workload, servers["double"])
        quiet["before the latency runs"] = c.wait_for_quiet(report.QUIET_CORES, args.quiet_wait)
        base = measure_latency(runner, args, caches, workload, servers)
        quiet["before the throughput runs"] = c.wait_for_quiet(report.QUIET_CORES, args.quiet_wait)
        base_tp = measure_throughput(runner, caches, workload, servers)
        results: list[quality.QualityResult] = []
        qs = None
        if not args.no_quality:
            for cache in caches:
                procs.stop(cache.server)
            qs, results = measure_quality(procs, args, work_dir)
        text = report.report(
            args, workload, caches, base, base_tp, results, qs, quiet, started, versions()
        )
    c.publish(TITLE, text, write=not args.no_write)


if __name__ == "__main__":
    main()
