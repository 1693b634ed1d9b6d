"""Semantic tier speed: near-duplicate hit latency, its breakdown, micro-batching, miss overhead.

Run from the repo root: ``.venv/bin/python bench/semantic_perf.py`` (about 8-10 minutes).

Everything runs in this process on 127.0.0.1: the stand-in model (``proxy.standin.StandIn``,
latency 0) and the real proxy (``proxy.app.create_app``) on ``web.AppRunner``s, and one aiohttp
client on the same event loop (its own cost is in every figure, the direct-upstream baseline's
too). For each embedder (EfficientNet-Lite0 with its packaged weights; open_clip ViT-B-32 with
random weights saved to a temporary checkpoint: speed does not depend on the weights), fp32, each
runtime (``--runtimes``: ONNX Runtime, the export cached in a temporary directory, and torch) and
each thread count, after waiting for the machine to be quiet (``--quiet`` cores of other work):

1. semantic hits: one MISS stores a ~150 KB 900x700 photo-like JPEG, ``settle``, then
   ``--hits`` distinct re-encodings (other JPEG quality / chroma subsampling, so never an exact
   hit) are sent one after another; every answer must carry ``X-Cache-Match: semantic``;
2. the miss path: a new question (new fingerprint) with the image, so the proxy forwards at
   once and embeds beside the upstream; p50 through vlcache minus p50 of the same bodies sent
   straight to the stand-in. ``settle`` runs (untimed) after each miss, as a real model's
   800+ ms would let the embedding finish before the next request;
3. the pieces of a hit timed directly, once the proxy has stopped: ``decode_picture``,
   ``make_thumbnail``, ``embedder.embed`` (batch 1, and through the ``MicroBatcher`` as the
   proxy does), a ``VectorIndex.search``, ``verify_prepared``, and the SQL reads of a hit
   (``answer_by_id``; ``thumbnails`` + ``prepare`` on an entry's first hit) on the proxy's
   store, reopened. Every torch call of these pieces runs on one thread of their own, and no
   other thread that ran torch work is alive by then: each such thread keeps an OpenMP team,
   and two teams on 2 cores slow both (``embeddings.embedder._load``);
4. micro-batching: images/s with 16 concurrent submits vs sequential ones, same batcher.

Then, per embedder, the two runtimes' vectors are compared on the real photos of the quality set
(``--equivalence refs``: its 708 reference pictures; ``all``: every picture, edits included;
built by ``python -m bench.quality.dataset`` when missing), decoded as the proxy decodes them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import hashlib
import importlib.metadata
import io
import json
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (str(REPO_ROOT), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _common as c  # noqa: E402
import aiohttp  # noqa: E402
import torch  # noqa: E402
from aiohttp import web  # noqa: E402
from exact_hit import photo_jpeg  # noqa: E402
from PIL import Image  # noqa: E402

from embeddings.embedder import (  # noqa: E402
    Embedder,
    cpu_has_native_bf16,
    load_embedder,
    pixel_batch,
)
from embeddings.onnx_runtime import MIN_COSINE  # noqa: E402
from embeddings.verifier import make_thumbnail, prepare, verify_prepared  # noqa: E402
from proxy.app import create_app, settle  # noqa: E402
from proxy.batcher import MicroBatcher  # noqa: E402
from proxy.semantic import decode_picture, embed_batch  # noqa: E402
from proxy.settings import Settings  # noqa: E402
from proxy.standin import StandIn  # noqa: E402
from store.cache import CacheStore  # noqa: E402
from store.index import VectorIndex  # noqa: E402

T = TypeVar("T")

TITLE = "Semantic tier speed (issue 3)"
CHAT = "/v1/chat/completions"
MAX_PIXELS = 40_000_000
TARGET_HIT_P99_MS = {"efficientnet-lite0": 10.0, "clip": 40.0}
TARGET_BATCH_RATIO = 1.5
TARGET_MISS_OVERHEAD_MS = 2.0
QUALITY_DIR = Path.home() / ".cache" / "vlcache-bench" / "quality"
EQUIVALENCE_BATCH = 16
HEADERS = {"Authorization": "Bearer bench-semantic-key"}
# The pieces of a semantic hit (see _pieces).
DECODE = "decode_picture (JPEG draft)"
THUMBNAIL = "make_thumbnail + prepare (beside the embedding)"
EMBED = "embed via MicroBatcher (incl. 2 ms max_wait)"
SEARCH = "VectorIndex.search (1 entry)"
VERIFY = "verify_prepared (stored side prepared and kept)"
ANSWER = "SQL: answer_by_id (beside the verifier)"


def ms(values: list[float], share: float) -> float:
    """Nearest-rank percentile (``share`` 0-1) of seconds, in ms."""
    return c.percentile(sorted(values), share * 100) * 1e3


def p50(values: list[float]) -> float:
    return ms(values, 0.5)


def variants(original: bytes, count: int) -> list[bytes]:
    """``count`` distinct re-encodings of ``original`` (quality x chroma subsampling)."""
    image = Image.open(io.BytesIO(original))
    image.load()
    seen = {hashlib.sha256(original).digest()}
    out: list[bytes] = []
    for quality in range(95, 55, -1):
        for subsampling in (2, 0, 1):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality, subsampling=subsampling)
            data = buffer.getvalue()
            digest = hashlib.sha256(data).digest()
            if digest not in seen:
                seen.add(digest)
                out.append(data)
            if len(out) == count:
                return out
    raise RuntimeError(f"only {len(out)} distinct re-encodings")


def chat(photo: bytes, question: str) -> bytes:
    uri = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    return json.dumps(
        {
            "model": "qwen3-vl-8b-instruct",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": uri}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            "max_tokens": 128,
        }
    ).encode()


@dataclass
class Config:
    """One measured embedder + runtime + thread count."""

    embedder: str
    runtime: str
    precision: str
    threads: int
    load_seconds: float = 0.0
    quiet_load: float = 0.0
    hits: list[float] = field(default_factory=list)
    matches: Counter[str] = field(default_factory=Counter)
    exact: list[float] = field(default_factory=list)
    pieces: dict[str, list[float]] = field(default_factory=dict)
    entry: int = 0  # the stored entry the hits find
    seq_rate: float = 0.0
    conc_rate: float = 0.0
    direct_rate: float = 0.0
    batches: str = ""
    miss: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    miss_outcomes: Counter[str] = field(default_factory=Counter)
    other_cores: float = 0.0

    @property
    def label(self) -> str:
        """How the tables name this configuration."""
        if self.embedder == "none":
            return "none"
        return f"{self.embedder} {self.runtime} {self.precision}, {self.threads} thr"


@dataclass
class Equivalence:
    """ONNX Runtime vs torch vectors of one embedder on the same decoded pictures."""

    embedder: str
    images: int
    min_cosine: float
    mean_gap: float
    max_abs: float
    worst: str
    torch_rate: float
    onnx_rate: float


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, Any, int]:
    started = time.perf_counter()
    async with session.post(
        url, data=body, headers={**HEADERS, "Content-Type": "application/json"}
    ) as response:
        await response.read()
        took = time.perf_counter() - started
        return took, response.headers, response.status


async def timed_async(fn: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


async def measure(
    config: Config, embedder: Embedder, photo: bytes, copies: list[bytes], args: argparse.Namespace
) -> None:
    """All phases of one configuration."""
    torch.set_num_threads(config.threads)
    standin = StandIn(latency=0.0)
    with tempfile.TemporaryDirectory(prefix="vlcache-semantic-") as data_dir:
        up_runner, up_url = await _start(standin.app())
        settings = Settings(
            upstream=up_url,
            data_dir=Path(data_dir),
            port=0,
            embedder=config.embedder,
            embed_precision=config.precision,
            embed_runtime=config.runtime,
            embed_threads=config.threads,
            log_level="WARNING",
        )
        app = create_app(settings, embedder=embedder)
        runner, base = await _start(app)
        try:
            async with aiohttp.ClientSession() as session:
                await _hits(config, session, base + CHAT, app, photo, copies, args)
                await _misses(config, session, base + CHAT, up_url + CHAT, app, photo, args)
        finally:
            await runner.cleanup()
            await up_runner.cleanup()
        # The pieces once the proxy's embed thread is gone: torch work on two threads at once
        # would leave two OpenMP teams, which slows both (embeddings.embedder._load).
        await _thread_gone("vlcache-embed")
        store = await CacheStore.open(settings.database_url)
        try:
            await _pieces(config, embedder, store, photo, copies, args)
        finally:
            await store.close()
    await _batching(config, embedder, copies, args)


async def _thread_gone(prefix: str, limit: float = 5.0) -> None:
    """Wait until no thread named ``prefix...`` is left (an executor shut down without wait)."""
    deadline = time.monotonic() + limit
    while any(t.name.startswith(prefix) for t in threading.enumerate()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"thread {prefix} still running after {limit} s")
        await asyncio.sleep(0.01)


async def _on(thread: ThreadPoolExecutor, fn: Callable[[], T]) -> tuple[float, T]:
    """``fn()`` run and timed on ``thread`` (the hand-off is not in the time)."""

    def run() -> tuple[float, T]:
        started = time.perf_counter()
        result = fn()
        return time.perf_counter() - started, result

    return await asyncio.get_running_loop().run_in_executor(thread, run)


async def _hits(
    config: Config,
    session: aiohttp.ClientSession,
    url: str,
    app: web.Application,
    photo: bytes,
    copies: list[bytes],
    args: argparse.Namespace,
) -> None:
    question = "What product is this, and what does it cost?"
    _, headers, status = await post(session, url, chat(photo, question))
    if headers.get("X-Cache") != "MISS" or status != 200:
        raise RuntimeError(f"priming request: {status} {headers.get('X-Cache')}")
    config.entry = int(headers["X-Cache-Entry"])
    await settle(app)
    bodies = [chat(copy, question) for copy in copies]
    for body in bodies[: args.warmup]:
        await post(session, url, body)
    for body in bodies[args.warmup :]:
        took, headers, status = await post(session, url, body)
        config.hits.append(took)
        config.matches[f"{status} {headers.get('X-Cache')} {headers.get('X-Cache-Match')}"] += 1
    exact = chat(photo, question)
    for _ in range(5):
        await post(session, url, exact)
    for _ in range(30):
        took, headers, _ = await post(session, url, exact)
        config.exact.append(took)


async def _pieces(
    config: Config,
    embedder: Embedder,
    store: CacheStore,
    photo: bytes,
    copies: list[bytes],
    args: argparse.Namespace,
) -> None:
    # Every torch call of the pieces on one thread, as the proxy makes them on its embed thread.
    torch_thread = ThreadPoolExecutor(1, thread_name_prefix="bench-torch")
    try:
        await _time_pieces(config, embedder, store, torch_thread, photo, copies, args)
    finally:
        torch_thread.shutdown()


async def _time_pieces(
    config: Config,
    embedder: Embedder,
    store: CacheStore,
    torch_thread: ThreadPoolExecutor,
    photo: bytes,
    copies: list[bytes],
    args: argparse.Namespace,
) -> None:
    entry = config.entry
    stored_image = decode_picture(photo, MAX_PIXELS)
    stored_thumb = prepare(make_thumbnail(stored_image))
    index = VectorIndex(embedder.id, embedder.dim)
    _, stored_vector = await _on(torch_thread, lambda: embedder.embed([stored_image]))
    index.add(entry, ("ns", "fp"), stored_vector)
    threshold = embedder.default_threshold
    batcher: MicroBatcher[Image.Image, np.ndarray] = MicroBatcher(
        partial(embed_batch, embedder),
        torch_thread,
        max_batch=16,
        max_wait=0.002,
        max_queue=64,
    )
    batcher.start()
    pieces: dict[str, list[float]] = {
        k: []
        for k in (
            "base64 decode + sha256 of the image",
            DECODE,
            THUMBNAIL,
            "embed, batch 1 (direct)",
            "of which preprocessing (resize, crop, to tensor, normalise)",
            EMBED,
            SEARCH,
            VERIFY,
            ANSWER,
            "first hit on an entry: SQL thumbnails + prepare (then kept in memory)",
        )
    }
    keys = list(pieces)
    uri = base64.b64encode(copies[0]).decode()
    for copy in copies[: args.pieces]:
        pieces[keys[0]].append(timed(lambda: hashlib.sha256(base64.b64decode(uri)).digest()))
        started = time.perf_counter()
        image = decode_picture(copy, MAX_PIXELS)
        pieces[keys[1]].append(time.perf_counter() - started)
        started = time.perf_counter()
        thumb = prepare(make_thumbnail(image))
        pieces[keys[2]].append(time.perf_counter() - started)
        took, vector = await _on(torch_thread, lambda image=image: embedder.embed([image]))
        pieces[keys[3]].append(took)
        took, _ = await _on(
            torch_thread, lambda image=image: pixel_batch(embedder.preprocess, [image])
        )
        pieces[keys[4]].append(took)
        pieces[keys[5]].append(await timed_async(lambda image=image: batcher.submit(image)))
        pieces[keys[6]].append(timed(lambda vector=vector: index.search(("ns", "fp"), vector, 0)))
        started = time.perf_counter()
        verdict = verify_prepared(thumb, stored_thumb)
        pieces[keys[7]].append(time.perf_counter() - started)
        if not verdict.passed:
            raise RuntimeError("verifier rejected a re-encoded copy")

        async def answer() -> None:
            if await store.answer_by_id(entry) is None:
                raise RuntimeError(f"entry {entry} not found")

        pieces[keys[8]].append(await timed_async(answer))

        async def first_hit() -> None:
            blobs = await store.thumbnails(entry)
            if len(blobs) != 1 or blobs[0] is None:
                raise RuntimeError(f"entry {entry} has no thumbnail")
            prepare(blobs[0])

        pieces[keys[9]].append(await timed_async(first_hit))
    await batcher.close()
    config.pieces = pieces
    config.pieces["_threshold"] = [threshold]


async def _misses(
    config: Config,
    session: aiohttp.ClientSession,
    url: str,
    direct_url: str,
    app: web.Application,
    photo: bytes,
    args: argparse.Namespace,
) -> None:
    for number in range(args.misses + 5):
        body = chat(photo, f"New question number {number} about {config.label}")
        took, headers, _ = await post(session, url, body)
        await settle(app)
        d_took, _, _ = await post(session, direct_url, body)
        if number >= 5:  # warm-up
            config.miss.append(took)
            config.direct.append(d_took)
            config.miss_outcomes[str(headers.get("X-Cache"))] += 1


async def miss_without_tier(photo: bytes, args: argparse.Namespace) -> Config:
    """The miss path of the same proxy with ``--embedder none``: what the tier itself adds."""
    config = Config("none", "none", "none", torch.get_num_threads())
    standin = StandIn(latency=0.0)
    with tempfile.TemporaryDirectory(prefix="vlcache-semantic-") as data_dir:
        up_runner, up_url = await _start(standin.app())
        settings = Settings(
            upstream=up_url, data_dir=Path(data_dir), port=0, embedder="none", log_level="WARNING"
        )
        app = create_app(settings)
        runner, base = await _start(app)
        try:
            async with aiohttp.ClientSession() as session:
                await _misses(config, session, base + CHAT, up_url + CHAT, app, photo, args)
        finally:
            await runner.cleanup()
            await up_runner.cleanup()
    return config


async def _batching(
    config: Config, embedder: Embedder, copies: list[bytes], args: argparse.Namespace
) -> None:
    images = [decode_picture(x, MAX_PIXELS) for x in copies[:16]]
    executor = ThreadPoolExecutor(1)
    batcher: MicroBatcher[Image.Image, np.ndarray] = MicroBatcher(
        partial(embed_batch, embedder), executor, max_batch=16, max_wait=0.002, max_queue=64
    )
    batcher.start()
    try:
        for image in images[:4]:
            await batcher.submit(image)
        await asyncio.gather(*(batcher.submit(image) for image in images))
        count = args.batch_images
        started = time.perf_counter()
        for number in range(count):
            await batcher.submit(images[number % len(images)])
        config.seq_rate = count / (time.perf_counter() - started)

        def one_at_a_time() -> None:
            for number in range(count):
                embedder.embed([images[number % len(images)]])

        took, _ = await _on(executor, one_at_a_time)  # on the batcher's thread, as it embeds
        config.direct_rate = count / took
        batches_before, items_before = batcher.batches, batcher.items
        started = time.perf_counter()
        for _ in range(count // 16):
            await asyncio.gather(*(batcher.submit(image) for image in images))
        config.conc_rate = (count // 16 * len(images)) / (time.perf_counter() - started)
        config.batches = (
            f"{batcher.items - items_before} images in {batcher.batches - batches_before} passes"
        )
    finally:
        await batcher.close()
        executor.shutdown()


def quality_pictures(which: str, directory: Path) -> list[Path]:
    """The quality set's reference pictures (``refs``) or every picture in it (``all``)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    paths = [ref["path"] for ref in manifest["references"]]
    if which == "all":
        paths += [pair["query"] for pair in manifest["pairs"]]
    return [directory / path for path in dict.fromkeys(paths)]


def equivalence(
    name: str, torch_embedder: Embedder, onnx_embedder: Embedder, paths: list[Path]
) -> Equivalence:
    """Cosine and largest component difference of the two runtimes' vectors, picture by picture."""
    cosines: list[npt.NDArray[np.float32]] = []
    gaps: list[npt.NDArray[np.float32]] = []
    spent = {"torch": 0.0, "onnx": 0.0}
    for start in range(0, len(paths), EQUIVALENCE_BATCH):
        chunk = paths[start : start + EQUIVALENCE_BATCH]
        images = [decode_picture(path.read_bytes(), MAX_PIXELS) for path in chunk]
        began = time.perf_counter()
        reference = torch_embedder.embed(images)
        spent["torch"] += time.perf_counter() - began
        began = time.perf_counter()
        vectors = onnx_embedder.embed(images)
        spent["onnx"] += time.perf_counter() - began
        cosines.append((reference * vectors).sum(axis=1))
        gaps.append(np.abs(reference - vectors).max(axis=1))
    cosine = np.concatenate(cosines)
    worst = int(cosine.argmin())
    return Equivalence(
        embedder=name,
        images=len(paths),
        min_cosine=float(cosine.min()),
        mean_gap=float((1.0 - cosine.astype(np.float64)).mean()),
        max_abs=float(np.concatenate(gaps).max()),
        worst=paths[worst].name,
        torch_rate=len(paths) / spent["torch"],
        onnx_rate=len(paths) / spent["onnx"],
    )


def report(
    every: list[Config],
    same: list[Equivalence],
    args: argparse.Namespace,
    started: float,
    photo: bytes,
) -> str:
    configs = [cfg for cfg in every if cfg.embedder != "none"]
    plain = next(cfg for cfg in every if cfg.embedder == "none")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    facts = c.machine_facts()
    measured = args.hits - args.warmup
    lines = [
        f"Command: `{shlex.join([sys.executable, *sys.argv])}` (repo root), {now}, "
        f"{time.perf_counter() - started:.0f} s in all. Code measured: "
        f"{c.describe_source(REPO_ROOT)}. Machine: {facts['nproc']} cores ({facts['cpu']}, "
        f"native bf16: {cpu_has_native_bf16()}), shared with other work: each configuration "
        f"waited (up to {args.quiet_wait:g} s) for other processes to use < {args.quiet:g} "
        "cores, and what they used while it ran is in the hits table; torch "
        f"{torch.__version__}, onnxruntime {_version('onnxruntime')}, onnxscript "
        f"{_version('onnxscript')}, Python {facts['python']}, aiohttp {facts['aiohttp']}.",
        "",
        "Set-up: stand-in model (latency 0) and `proxy.app.create_app` on `web.AppRunner`s in "
        "one process on 127.0.0.1, one aiohttp client in the same event loop (its cost is in "
        f"every figure, the direct baseline's too). Stored picture: a {len(photo) / 1024:.0f} KB "
        f"900x700 photo-like JPEG; {args.warmup} warm-up then {measured} re-encoded copies "
        "(JPEG quality 56-95 x chroma subsampling, each distinct bytes, so never exact), "
        "sequential; precision fp32 unless a row says bf16. EfficientNet-Lite0: "
        "packaged weights; CLIP ViT-B-32: random weights from a temporary checkpoint (speed "
        "does not depend on them). Runtime onnx: `load_embedder(runtime='onnx')`, the export "
        "cached in a temporary directory (the first configuration of an embedder exports, the "
        "others load the file).",
        "",
        "### Targets",
        "",
        "| target | config | measured | verdict |",
        "|---|---|---:|---|",
    ]
    for cfg in configs:
        target = TARGET_HIT_P99_MS[cfg.embedder]
        all_semantic = cfg.matches == Counter({"200 HIT semantic": measured})
        p99 = ms(cfg.hits, 0.99)
        lines.append(
            f"| semantic hit p50 (issue 3) and p99 <= {target:g} ms, every answer `semantic` | "
            f"{cfg.label} | p50 {p50(cfg.hits):.1f} / p99 {p99:.1f} ms, "
            f"{cfg.matches['200 HIT semantic']}/{measured} semantic | "
            f"p50 {c.verdict(p50(cfg.hits) <= target and all_semantic)}, "
            f"p99 {c.verdict(p99 <= target and all_semantic)} |"
        )
    for cfg in configs:
        ratio = cfg.conc_rate / cfg.seq_rate
        lines.append(
            f"| 16 concurrent >= {TARGET_BATCH_RATIO}x sequential batch-1 (MicroBatcher) | "
            f"{cfg.label} | {cfg.conc_rate:.1f} vs {cfg.seq_rate:.1f} "
            f"img/s = {ratio:.2f}x (vs direct `embed` batch 1, no batcher: "
            f"{cfg.conc_rate / cfg.direct_rate:.2f}x) | {c.verdict(ratio >= TARGET_BATCH_RATIO)} |"
        )
    for cfg in configs:
        overhead = p50(cfg.miss) - p50(cfg.direct)
        lines.append(
            f"| miss p50 - direct p50 <= {TARGET_MISS_OVERHEAD_MS:g} ms (new question + image) | "
            f"{cfg.label} | {p50(cfg.miss):.2f} - {p50(cfg.direct):.2f} = "
            f"{overhead:.2f} ms | {c.verdict(overhead <= TARGET_MISS_OVERHEAD_MS)} |"
        )
    lines += [
        "",
        "### Semantic hits through the proxy",
        "",
        "| config | p50 | p90 | p99 | max | mean | answers | exact hit p50 (same setup) "
        "| other processes' CPU cores (before / during) | `load_embedder` |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for cfg in configs:
        answers = ", ".join(f"{k}: {v}" for k, v in cfg.matches.items())
        lines.append(
            f"| {cfg.label} | {p50(cfg.hits):.2f} ms | "
            f"{ms(cfg.hits, 0.9):.2f} ms | {ms(cfg.hits, 0.99):.2f} ms | "
            f"{max(cfg.hits) * 1e3:.2f} ms | {statistics.fmean(cfg.hits) * 1e3:.2f} ms | "
            f"{answers} | {p50(cfg.exact):.2f} ms | {cfg.quiet_load:.2f} / "
            f"{cfg.other_cores:.2f} | {cfg.load_seconds:.1f} s |"
        )
    lines += [
        "",
        "### Where a semantic hit's time goes",
        "",
        f"Each piece called directly, {args.pieces} re-encoded copies, p50 (p99) in ms, once the"
        " proxy has stopped (torch calls on one thread of their own, the only one with torch "
        "work alive). The proxy decodes in its CPU pool, then embeds through the micro-batcher "
        "on its embed thread while the CPU pool makes and prepares the thumbnail; then the "
        "search on the index thread, and the verifier on prepared thumbnails in the CPU pool "
        "while the answer is read. The rest of a hit (HTTP, JSON parse, base64 + sha256 keying,"
        " exact lookup, thread hand-offs, building the answer) is about the exact-hit p50 "
        "above.",
        "",
        "| piece | " + " | ".join(cfg.label for cfg in configs) + " |",
        "|---|" + "---:|" * len(configs),
    ]
    keys = [k for k in configs[0].pieces if not k.startswith("_")]
    for key in keys:
        cells = [f"{p50(cfg.pieces[key]):.2f} ({ms(cfg.pieces[key], 0.99):.2f})" for cfg in configs]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    sums = []
    for cfg in configs:
        piece = {k: p50(v) for k, v in cfg.pieces.items()}
        total = (
            piece[DECODE]
            + max(piece[EMBED], piece[THUMBNAIL])
            + piece[SEARCH]
            + max(piece[VERIFY], piece[ANSWER])
        )
        sums.append(f"{total:.2f}")
    lines.append(
        "| critical path: decode + max(batcher embed, thumbnail) + search + max(verify, answer) | "
        + " | ".join(sums)
        + " |"
    )
    lines += [
        "",
        "### Micro-batching and the miss path",
        "",
        f"Batching: {args.batch_images} images per run, the same 16 decoded copies; sequential = "
        "one `submit` awaited at a time (each waits the batcher's 2 ms `max_wait` alone); "
        "concurrent = 16 `submit`s gathered per round. Miss: "
        f"{args.misses} new questions (after 5 warm-up), each also sent straight to the stand-in.",
        "",
        "| config | sequential via batcher | direct `embed` batch 1 | 16 concurrent | passes | "
        "miss p50 | direct p50 | miss p99 | miss answers |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for cfg in configs:
        outcomes = ", ".join(f"{k}: {v}" for k, v in cfg.miss_outcomes.items())
        lines.append(
            f"| {cfg.label} | {cfg.seq_rate:.1f} img/s | "
            f"{cfg.direct_rate:.1f} img/s | {cfg.conc_rate:.1f} img/s | {cfg.batches} | "
            f"{p50(cfg.miss):.2f} ms | {p50(cfg.direct):.2f} ms | {ms(cfg.miss, 0.99):.2f} ms | "
            f"{outcomes} |"
        )
    lines += [
        "",
        f"Same miss workload through the proxy with `--embedder none` (no semantic tier): p50 "
        f"{p50(plain.miss):.2f} ms vs direct {p50(plain.direct):.2f} ms = "
        f"{p50(plain.miss) - p50(plain.direct):.2f} ms of proxy overhead without any embedding "
        f"(p99 {ms(plain.miss, 0.99):.2f} ms; answers "
        + ", ".join(f"{k}: {v}" for k, v in plain.miss_outcomes.items())
        + "). The difference to the rows above is what starting the embedding beside the "
        "upstream costs the miss.",
    ]
    lines += equivalence_lines(same, args)
    return "\n".join(lines)


def equivalence_lines(same: list[Equivalence], args: argparse.Namespace) -> list[str]:
    """The section's part on ONNX Runtime vs torch vectors."""
    if args.equivalence == "none":
        return []
    lines = [
        "",
        "### Same vectors from both runtimes",
        "",
        f"`{args.equivalence}` pictures of the quality set (`{args.quality_dir}`), decoded as "
        "the proxy does (`proxy.semantic.decode_picture`), embedded by torch and by ONNX "
        f"Runtime (fp32, batches of {EQUIVALENCE_BATCH}, the last thread count above); per "
        "picture the cosine of the two unit vectors and their largest component difference. "
        f"The export is refused below cosine {MIN_COSINE} on any row (checked on a probe batch at "
        "every load); the embedder id is shared when every picture reaches it.",
        "",
    ]
    if not same:
        return [
            *lines,
            "Not measured: the quality set is missing (`python -m bench.quality.dataset`) or one "
            "runtime was not in `--runtimes`.",
        ]
    lines += [
        "| embedder | pictures | min cosine | mean 1 - cosine | max abs difference | "
        "worst picture | torch b16 | onnx b16 | same id |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in same:
        lines.append(
            f"| {row.embedder} | {row.images} | {row.min_cosine:.9f} | {row.mean_gap:.2e} | "
            f"{row.max_abs:.2e} | `{row.worst}` | {row.torch_rate:.1f} img/s | "
            f"{row.onnx_rate:.1f} img/s | {'yes' if row.min_cosine >= MIN_COSINE else 'NO'} |"
        )
    return lines


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def clip_checkpoint(directory: Path) -> Path:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    path = directory / "vit-b-32-random.pt"
    torch.save(model.state_dict(), path)
    return path


async def run(args: argparse.Namespace) -> tuple[list[Config], list[Equivalence]]:
    photo, _ = photo_jpeg()
    copies = await asyncio.to_thread(variants, photo, args.hits)
    configs: list[Config] = []
    same: list[Equivalence] = []
    threads = [int(t) for t in args.threads.split(",")]
    runtimes = args.runtimes.split(",")
    pictures: list[Path] = []
    if args.equivalence != "none" and (args.quality_dir / "manifest.json").is_file():
        pictures = quality_pictures(args.equivalence, args.quality_dir)
    with tempfile.TemporaryDirectory(prefix="vlcache-semantic-models-") as tmp:
        for name in args.embedders.split(","):
            clip: dict[str, str] = {}
            if name == "clip":
                path = c.on_own_thread(partial(clip_checkpoint, Path(tmp)))
                clip = {"clip_model": "ViT-B-32", "clip_pretrained": str(path)}
            last: dict[str, Embedder] = {}
            for item in runtimes:
                runtime, _, precision = item.partition(":")
                for count in threads:
                    began = time.perf_counter()
                    embedder = load_embedder(
                        name,
                        precision=precision or "fp32",
                        runtime=runtime,
                        threads=count,
                        cache_dir=Path(tmp) / "models",
                        **clip,
                    )
                    config = Config(
                        name, runtime, precision or "fp32", count, time.perf_counter() - began
                    )
                    config.quiet_load = c.wait_for_quiet(args.quiet, args.quiet_wait)
                    busy, own, wall = c.machine_busy_seconds(), time.process_time(), time.time()
                    with c.timed(config.label):
                        await measure(config, embedder, photo, copies, args)
                    others = (c.machine_busy_seconds() - busy) - (time.process_time() - own)
                    config.other_cores = max(others, 0.0) / (time.time() - wall)
                    print(
                        f"bench: {config.label}: hit p50 {p50(config.hits):.1f} "
                        f"p99 {ms(config.hits, 0.99):.1f} ms {dict(config.matches)}",
                        file=sys.stderr,
                    )
                    configs.append(config)
                    last[item] = embedder
            if pictures and {"torch", "onnx"} <= last.keys():
                with c.timed(f"{name}: torch vs onnx on {len(pictures)} pictures"):
                    same.append(
                        c.on_own_thread(
                            partial(equivalence, name, last["torch"], last["onnx"], pictures)
                        )
                    )
                print(f"bench: {same[-1]}", file=sys.stderr)
    with c.timed("miss path with --embedder none"):
        configs.append(await miss_without_tier(photo, args))
    return configs, same


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hits", type=int, default=110, help="re-encoded copies (incl. warm-up)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pieces", type=int, default=40, help="copies timed piece by piece")
    parser.add_argument("--misses", type=int, default=60)
    parser.add_argument("--batch-images", type=int, default=64)
    parser.add_argument("--embedders", default="efficientnet-lite0,clip")
    parser.add_argument(
        "--runtimes",
        default="onnx,torch",
        help="embedder runtimes to try, each RUNTIME[:PRECISION] (fp32 unless given), "
        "e.g. onnx,torch,torch:bf16",
    )
    parser.add_argument("--threads", default="1,2", help="embedder thread counts to try")
    parser.add_argument(
        "--equivalence",
        choices=("refs", "all", "none"),
        default="refs",
        help="quality-set pictures on which to compare the runtimes' vectors",
    )
    parser.add_argument("--quality-dir", type=Path, default=QUALITY_DIR)
    parser.add_argument(
        "--quiet", type=float, default=0.25, help="most cores other processes may use at a start"
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=120.0, help="longest wait for a quiet machine (s)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    configs, same = asyncio.run(run(args))
    photo, _ = photo_jpeg()
    text = report(configs, same, args, started, photo)
    c.publish(TITLE, text, write=not args.no_write)


if __name__ == "__main__":
    main()
