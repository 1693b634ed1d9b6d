"""Streaming and coalescing benchmark (issue 4): vlcache in front of a model that streams.

Run from the repo root: ``.venv/bin/python bench/stream_coalesce.py`` (about 2 minutes).

Three processes, all on 127.0.0.1:

- the stand-in model (``serve_paced`` below, ``proxy.standin.StandIn`` answering at a model's
  pace): a streamed answer is ``--chunks`` ``chat.completion.chunk`` frames ``--gap-ms`` apart, the
  first ``--prefill-ms`` after the request (the headers go out at once, as vLLM's do), then the
  stop frame and ``data: [DONE]``; a plain answer comes whole after the same time;
- vlcache: ``vlcache serve --upstream <stand-in> --embedder none`` on a fresh data directory;
- this client: aiohttp on its own event loop, sharing none with the servers.

Times run from just before the request is sent: TTFB to the first byte of the body (the first
frame), total to the last. Phases:

1. Streamed misses through vlcache and direct to the stand-in, interleaved in pairs (each request
   a new question, so every one through vlcache is a miss): once with a ~150 KB photo in the
   request, once text only. Also counted: the reads the client made per answer (one per frame
   when nothing is buffered on the way).
2. Streamed hits: the questions of phase 1 again through vlcache (every one ``X-Cache: HIT``).
3. Coalescing: ``--rounds`` rounds of ``--clients`` concurrent identical misses (streamed, then
   plain), each round after one direct call of another new question; the stand-in's count of
   model calls per round (target 1) and the latency of the 50 against that one direct call.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import json
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

TITLE = "Streaming and coalescing (issue 4)"
CHAT_PATH = "/v1/chat/completions"
MODEL = "qwen3-vl-8b-instruct"
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
TTFB_TARGET_MS = 2.0  # a streamed miss's first byte, over the upstream's
COALESCE_TARGET_CALLS = 1


# --- the stand-in model (its own process) --------------------------------------------------------


def serve_paced(port: int, chunks: int, gap: float, prefill: float) -> None:
    """The stand-in at a model's pace on 127.0.0.1:port, until SIGTERM.

    ``GET /_bench/calls`` answers ``{"posts": N}``, the model calls so far.
    """
    from aiohttp import web

    from proxy.standin import StandIn, answer_text, openai_answer

    def frame(delta: dict[str, str], finish: str | None) -> bytes:
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    class Paced(StandIn):
        async def answer(
            self, request: web.Request, doc: dict[str, Any], body: bytes
        ) -> web.StreamResponse:
            text = answer_text(body)
            if doc.get("stream") is not True:
                await asyncio.sleep(prefill + (chunks - 1) * gap)
                return web.json_response(openai_answer(MODEL, text))
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            await asyncio.sleep(prefill)
            for n in range(chunks):
                if n:
                    await asyncio.sleep(gap)
                piece = text[n * len(text) // chunks : (n + 1) * len(text) // chunks]
                delta = {"role": "assistant", "content": piece} if n == 0 else {"content": piece}
                await response.write(frame(delta, None))
            await response.write(frame({}, "stop"))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

    c.run_counted(Paced(), port)


def paced_runner(port: int, chunks: int, gap: float, prefill: float) -> list[str]:
    """The argv running ``serve_paced`` in a fresh interpreter."""
    code = (
        f"import sys; sys.path.insert(0, {str(c.BENCH_DIR)!r}); import stream_coalesce; "
        f"stream_coalesce.serve_paced({port!r}, {chunks!r}, {gap!r}, {prefill!r})"
    )
    return [sys.executable, "-c", code]


# --- the client ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """One answer as the client saw it (seconds from just before the request was sent)."""

    cache: str
    match: str
    ttfb: float
    total: float
    reads: int
    complete: bool


def chat_body(question: str, photo_uri: str | None, *, stream: bool) -> bytes:
    content: list[dict[str, Any]] = []
    if photo_uri is not None:
        content.append({"type": "image_url", "image_url": {"url": photo_uri}})
    content.append({"type": "text", "text": question})
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        "max_tokens": 128,
    }
    return json.dumps(request).encode()


async def timed_post(session: Any, url: str, body: bytes) -> Timed:
    """POST ``body`` and time its answer's first and last bytes."""
    started = time.perf_counter()
    first = None
    reads = 0
    tail = b""
    async with session.post(url + CHAT_PATH, data=body, headers=HEADERS) as response:
        async for piece in response.content.iter_any():
            if first is None:
                first = time.perf_counter()
            reads += 1
            tail = (tail + piece)[-16:]
        ended = time.perf_counter()
        streamed = response.content_type == "text/event-stream"
        complete = response.status == 200 and (not streamed or tail.endswith(b"[DONE]\n\n"))
        return Timed(
            cache=response.headers.get("X-Cache", ""),
            match=response.headers.get("X-Cache-Match", ""),
            ttfb=(first or ended) - started,
            total=ended - started,
            reads=reads,
            complete=complete,
        )


class Phase:
    """CPU that other processes took while a phase ran (they skew every figure)."""

    def __init__(self, procs: c.Processes) -> None:
        self._procs = procs
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        ours = self._procs.cpu_seconds() + own.ru_utime + own.ru_stime
        return time.perf_counter(), c.machine_busy_seconds(), ours

    def other_cores(self) -> float:
        """Cores kept busy by processes other than the servers and this client."""
        wall, busy, ours = (b - a for a, b in zip(self._start, self._sample(), strict=True))
        return max(busy - ours, 0.0) / wall if wall else 0.0


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def pct(values: Sequence[float], share: float) -> float:
    return c.percentile(sorted(values), share)


def check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(what)


@dataclass
class MissPairs:
    """Phase 1 for one request body kind."""

    kind: str
    direct: list[Timed]
    proxy: list[Timed]
    questions: list[str]
    other_cores: float


async def streamed_misses(
    session: Any, direct: str, proxy: str, photo: str | None, kind: str, n: int, procs: Any
) -> MissPairs:
    phase = Phase(procs)
    pairs = MissPairs(kind, [], [], [], 0.0)
    for i in range(n):
        order = [(direct, pairs.direct), (proxy, pairs.proxy)]
        if i % 2:
            order.reverse()
        for url, out in order:
            question = f"{kind} {i} via {'vlcache' if url == proxy else 'direct'}: what is it?"
            timed = await timed_post(session, url, chat_body(question, photo, stream=True))
            check(timed.complete, f"{kind} {i}: incomplete answer from {url}")
            if url == proxy:
                check(timed.cache == "MISS", f"{kind} {i}: X-Cache {timed.cache}, not MISS")
                pairs.questions.append(question)
            out.append(timed)
    pairs.other_cores = phase.other_cores()
    return pairs


@dataclass
class Round:
    """One round of concurrent identical misses, after one direct call."""

    stream: bool
    baseline: Timed
    results: list[Timed]
    calls: int


async def coalesce(
    session: Any, direct: str, proxy: str, photo: str | None, stream: bool, tag: str, args: Any
) -> Round:
    kind = "streamed" if stream else "plain"
    baseline = await timed_post(session, direct, chat_body(f"{tag} alone", photo, stream=stream))
    before = await asyncio.to_thread(c.upstream_posts, args.upstream_port)
    body = chat_body(f"{tag}: all at once, {kind}?", photo, stream=stream)
    results = await asyncio.gather(*(timed_post(session, proxy, body) for _ in range(args.clients)))
    calls = await asyncio.to_thread(c.upstream_posts, args.upstream_port) - before
    check(all(r.complete for r in results), f"{tag}: an incomplete answer")
    return Round(stream, baseline, list(results), calls)


@dataclass
class Figures:
    """Everything measured in one run."""

    misses: list[MissPairs]
    hits: list[Timed]
    hit_calls: int
    hit_other_cores: float
    rounds: list[Round]
    coalesce_other_cores: float


async def measure(args: Any, direct: str, proxy: str, photo: str, procs: Any) -> Figures:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(5):  # warm-up: connections, first-use costs on both sides
            for url in (direct, proxy):
                await timed_post(session, url, chat_body(f"warm-up {i}", photo, stream=True))
        misses = []
        for kind, uri in (("photo", photo), ("text", None)):
            with c.timed(f"streamed misses, {kind}: {args.requests} pairs"):
                misses.append(
                    await streamed_misses(session, direct, proxy, uri, kind, args.requests, procs)
                )
        phase = Phase(procs)
        before = await asyncio.to_thread(c.upstream_posts, args.upstream_port)
        hits = []
        with c.timed(f"streamed hits: {args.requests}"):
            for question in misses[0].questions:
                timed = await timed_post(session, proxy, chat_body(question, photo, stream=True))
                check(timed.cache == "HIT" and timed.complete, f"hit: {timed}")
                hits.append(timed)
        hit_calls = await asyncio.to_thread(c.upstream_posts, args.upstream_port) - before
        hit_other = phase.other_cores()
        await coalesce(session, direct, proxy, photo, True, "warm-up round", args)
        phase = Phase(procs)
        rounds = []
        with c.timed(f"coalescing: {args.rounds} rounds x {args.clients} clients, twice"):
            for stream in (True, False):
                for n in range(args.rounds):
                    tag = f"round {n} {'streamed' if stream else 'plain'}"
                    rounds.append(await coalesce(session, direct, proxy, photo, stream, tag, args))
        return Figures(misses, hits, hit_calls, hit_other, rounds, phase.other_cores())


# --- the report ----------------------------------------------------------------------------------


def miss_table(pairs: MissPairs) -> list[str]:
    def row(label: str, values: list[Timed]) -> str:
        ttfb, total = [t.ttfb for t in values], [t.total for t in values]
        reads = sum(t.reads for t in values) / len(values)
        return (
            f"| {label} | {ms(pct(ttfb, 50))} | {ms(pct(ttfb, 99))} | {ms(pct(total, 50))} | "
            f"{ms(pct(total, 99))} | {reads:.1f} |"
        )

    def delta(share: float, field: str) -> float:
        mine = pct([getattr(t, field) for t in pairs.proxy], share)
        theirs = pct([getattr(t, field) for t in pairs.direct], share)
        return mine - theirs

    def ratio(share: float, field: str) -> float:
        mine = pct([getattr(t, field) for t in pairs.proxy], share)
        return mine / pct([getattr(t, field) for t in pairs.direct], share)

    return [
        f"| {pairs.kind} request, {len(pairs.proxy)} pairs | TTFB p50 ms | TTFB p99 ms | "
        "total p50 ms | total p99 ms | reads per answer |",
        "|---|---:|---:|---:|---:|---:|",
        row("direct to the stand-in", pairs.direct),
        row("through vlcache (MISS)", pairs.proxy),
        f"| vlcache minus direct | {delta(50, 'ttfb') * 1000:+.2f} | "
        f"{delta(99, 'ttfb') * 1000:+.2f} | {delta(50, 'total') * 1000:+.2f} | "
        f"{delta(99, 'total') * 1000:+.2f} | |",
        f"| vlcache / direct | {ratio(50, 'ttfb'):.3f}x | {ratio(99, 'ttfb'):.3f}x | "
        f"{ratio(50, 'total'):.3f}x | {ratio(99, 'total'):.3f}x | |",
    ]


def spread(values: list[float]) -> str:
    return f"{ms(pct(values, 50))} / {ms(pct(values, 99))} / {ms(max(values))}"


def coalesce_rows(rounds: list[Round]) -> list[str]:
    rows = []
    for stream in (True, False):
        mine = [r for r in rounds if r.stream is stream]
        if not mine:
            continue
        results = [t for r in mine for t in r.results]
        leaders = [t for t in results if t.cache == "MISS"]
        followers = [t for t in results if (t.cache, t.match) == ("HIT", "coalesced")]
        base_ttfb = pct([r.baseline.ttfb for r in mine], 50)
        base_total = pct([r.baseline.total for r in mine], 50)
        totals = [t.total for t in results]
        rows.append(
            f"| {'streamed' if stream else 'plain'} | {len(mine)} x {len(mine[0].results)} | "
            f"{', '.join(str(r.calls) for r in mine)} | {len(leaders)} / {len(followers)} | "
            f"{ms(pct([t.ttfb for t in leaders], 50))} | {spread([t.ttfb for t in followers])} | "
            f"{spread(totals)} | {ms(base_ttfb)} | {ms(base_total)} | "
            f"{pct(totals, 99) / base_total:.2f}x |"
        )
    return rows


def report(args: Any, figures: Figures, facts: dict[str, str], background: float) -> str:
    photo_pairs = figures.misses[0]
    ttfb_over = pct([t.ttfb for t in photo_pairs.proxy], 50) - pct(
        [t.ttfb for t in photo_pairs.direct], 50
    )
    calls = [r.calls for r in figures.rounds]
    verdict = {True: "**PASS**", False: "**FAIL**"}
    hit_ttfb = [t.ttfb for t in figures.hits]
    hit_total = [t.total for t in figures.hits]
    direct_ttfb = [t.ttfb for t in photo_pairs.direct]
    direct_total = [t.total for t in photo_pairs.direct]
    others = [p.other_cores for p in figures.misses]
    others += [figures.hit_other_cores, figures.coalesce_other_cores]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Command: `{shlex.join([sys.executable, *sys.argv])}` (repo root), {now}, "
        f"{args.elapsed:.0f} s in all. Code measured: {c.describe_source(c.REPO_ROOT)}, run as "
        f"`vlcache serve --upstream <stand-in> --port <p> --admin-port <p> --data-dir <fresh "
        f"tmp> --embedder none --log-level {args.log_level}`.",
        "",
        f"Machine: {facts['nproc']} cores ({facts['cpu']}), Linux {facts['kernel']}, Python "
        f"{facts['python']}, aiohttp {facts['aiohttp']}. Other processes kept {background:.2f} "
        f"cores busy at the start and {max(others):.2f} at most during a phase.",
        "",
        f"Stand-in model (its own process): a streamed answer is {args.chunks} "
        f"`chat.completion.chunk` frames {args.gap_ms:g} ms apart, the first {args.prefill_ms:g} "
        "ms after the request (headers at once), then the stop frame and `data: [DONE]`; a plain "
        f"answer comes whole after the same {args.prefill_ms + (args.chunks - 1) * args.gap_ms:g}"
        " ms. vlcache in its own process; the client is aiohttp on this script's own loop. Times "
        "from just before sending: TTFB to the first body byte (the first frame), total to the "
        f"last. Photo requests carry a {args.photo_kb:.0f} KB JPEG as a data URI.",
        "",
        "### Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| streamed miss TTFB within {TTFB_TARGET_MS:g} ms of the upstream's (p50, photo "
        f"request) | {ttfb_over * 1000:+.2f} ms | {verdict[ttfb_over * 1000 <= TTFB_TARGET_MS]} |",
        f"| {args.clients} concurrent identical misses -> {COALESCE_TARGET_CALLS} upstream call "
        f"| {', '.join(map(str, calls))} (per round) "
        f"| {verdict[all(n == COALESCE_TARGET_CALLS for n in calls)]} |",
        "",
        "### Streamed miss: through vlcache vs direct",
        "",
        "Interleaved pairs, each request a new question. `reads per answer`: chunks the client "
        "received (one per frame when nothing on the way holds frames back).",
        "",
        *miss_table(photo_pairs),
        "",
        *miss_table(figures.misses[1]),
        "",
        "### Streamed hit",
        "",
        "| | first chunk p50 ms | p99 ms | total p50 ms | p99 ms | vs direct miss (total p50) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| vlcache HIT, {len(figures.hits)} photo requests | {ms(pct(hit_ttfb, 50))} | "
        f"{ms(pct(hit_ttfb, 99))} | {ms(pct(hit_total, 50))} | {ms(pct(hit_total, 99))} | "
        f"{pct(hit_total, 50) / pct(direct_total, 50):.3f}x |",
        f"| direct miss (phase above) | {ms(pct(direct_ttfb, 50))} | {ms(pct(direct_ttfb, 99))} "
        f"| {ms(pct(direct_total, 50))} | {ms(pct(direct_total, 99))} | 1x |",
        "",
        f"Upstream calls during the hits: {figures.hit_calls}.",
        "",
        "### Coalescing: concurrent identical misses",
        "",
        "Each round: one direct call of a new question, then the clients at once with another "
        "new question (photo request). Leader / followers: answers with `X-Cache: MISS` / "
        "`HIT` + `X-Cache-Match: coalesced`. Latencies in ms, p50 / p99 / max.",
        "",
        "| kind | rounds x clients | upstream calls per round | leader / followers | leader "
        "TTFB p50 | followers' TTFB | total, all | one direct call: TTFB p50 | total p50 | "
        "total p99 / direct total |",
        "|---|---|---|---|---:|---|---|---:|---:|---:|",
        *coalesce_rows(figures.rounds),
    ]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Start the stand-in and vlcache, measure, print and publish to bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50, help="miss pairs (and hits) per kind")
    parser.add_argument("--clients", type=int, default=50, help="concurrent identical misses")
    parser.add_argument("--rounds", type=int, default=5, help="coalescing rounds per kind")
    parser.add_argument("--chunks", type=int, default=20, help="frames of a streamed answer")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="time between frames")
    parser.add_argument("--prefill-ms", type=float, default=50.0, help="time to the first frame")
    parser.add_argument("--photo-kb", type=float, default=150.0, help="JPEG size in requests")
    parser.add_argument("--log-level", default="INFO", help="vlcache's log level")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="wait for a quiet machine")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)

    from exact_hit import photo_jpeg

    started = time.perf_counter()
    vlcache = c.tool("vlcache")
    background = c.wait_for_quiet(0.25, args.quiet_wait)
    jpeg, _ = photo_jpeg(int(args.photo_kb * 1024))
    args.photo_kb = len(jpeg) / 1024
    photo = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    with (
        tempfile.TemporaryDirectory(prefix="vlcache-bench-") as tmp,
        c.Processes(Path(tmp)) as procs,
    ):
        args.upstream_port = c.free_port()
        upstream = procs.start(
            "stand-in",
            paced_runner(
                args.upstream_port, args.chunks, args.gap_ms / 1000, args.prefill_ms / 1000
            ),
            args.upstream_port,
            ready_path=c.CALLS_PATH,
        )
        port, admin_port = c.free_port(), c.free_port()
        argv_vlcache = [
            vlcache, "serve", "--upstream", upstream.url, "--port", str(port),
            "--admin-port", str(admin_port), "--data-dir", str(Path(tmp) / "data"),
            "--embedder", "none", "--log-level", args.log_level,
        ]  # fmt: skip
        proxy = procs.start("vlcache", argv_vlcache, port, ready_path="/v1/models")
        figures = asyncio.run(measure(args, upstream.url, proxy.url, photo, procs))
        proxy.check_alive()
    args.elapsed = time.perf_counter() - started
    c.publish(TITLE, report(args, figures, c.machine_facts(), background), write=not args.no_write)


if __name__ == "__main__":
    main()
