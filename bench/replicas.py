"""Two vlcache replicas on one PostgreSQL database: how soon one sees the other's answers.

Two ``vlcache serve`` processes share a fresh PostgreSQL database (created and dropped by this
script) in front of the stand-in model. For each of ``--rounds`` new questions, replica A answers
a miss; from the moment A's answer arrives, replica B is probed every 10 ms until it serves the
answer as a hit. The probe carries ``Cache-Control: no-store``, so B's misses never store an
entry of their own: the first HIT is A's entry reaching B. Exact: the same request (B finds A's
row in SQL once A's writer committed it). Semantic: a re-encoded copy of A's picture (B's FAISS
index must have followed A's entry through its sync loop). Then both replicas stay idle for
``--idle`` seconds and their CPU time is read from /proc: the cost of following the database.

Targets (issue 6): cross-replica visibility <= 1 s p99; an idle replica's sync loop < 2% of one
core.

    .venv/bin/python bench/replicas.py            # from the repo root
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path

import _common as c
import asyncpg  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from proxy.demo import product_photo, reencoded  # noqa: E402

TITLE = "Replicas on PostgreSQL: cross-replica visibility and idle sync cost"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PROBE_EVERY = 0.01
VISIBILITY_TARGET = 1.0
IDLE_TARGET = 0.02


def chat(question: str, photo: bytes) -> bytes:
    uri = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
    return json.dumps(
        {"model": "qwen3-vl-8b-instruct", "messages": [{"role": "user", "content": content}]}
    ).encode()


def ask(server: c.Server, body: bytes, **headers: str) -> dict[str, str]:
    status, answer_headers, _ = c.http_request(
        server.port,
        "POST",
        "/v1/chat/completions",
        body,
        {"Content-Type": "application/json", "Authorization": "Bearer sk-bench", **headers},
    )
    if status != 200:
        raise RuntimeError(f"{server.name} answered {status}")
    return answer_headers


def visible_after(b: c.Server, body: bytes, started: float, limit: float = 10.0) -> float:
    """Seconds from ``started`` until B serves ``body`` as a hit (probes store nothing)."""
    while True:
        headers = ask(b, body, **{"Cache-Control": "no-store"})
        if headers.get("X-Cache") == "HIT":
            return time.monotonic() - started
        if time.monotonic() - started > limit:
            raise RuntimeError(f"not visible on {b.name} after {limit} s")
        time.sleep(PROBE_EVERY)


def measure(rounds: int, idle: float, embedder: str) -> dict[str, object]:
    import asyncio

    name = "vlcache_bench_" + uuid.uuid4().hex[:8]

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    db = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    try:
        with (
            tempfile.TemporaryDirectory(prefix="vlcache-replicas-") as tmp,
            c.Processes(Path(tmp)) as processes,
        ):
            upstream_port = c.free_port()
            upstream = processes.start(
                "upstream", c.python_runner("serve_standin", upstream_port), upstream_port
            )
            replicas = []
            for label in ("A", "B"):
                port = c.free_port()
                argv = [
                    c.tool("vlcache"),
                    "serve",
                    "--port",
                    str(port),
                    "--admin-port",
                    str(c.free_port()),
                    "--upstream",
                    upstream.url,
                    "--db",
                    db,
                    "--data-dir",
                    str(Path(tmp) / label),
                    "--embedder",
                    embedder,
                    "--log-level",
                    "WARNING",
                ]
                replicas.append(
                    processes.start(
                        f"replica-{label}", argv, port, ready_path="/v1/models", timeout=120
                    )
                )
            a, b = replicas
            exact, semantic = [], []
            for number in range(rounds):
                photo = product_photo(f"Model {number}", f"{1000 + number}", 20 + number % 200)
                body = chat(f"Round {number}: which phone is this?", photo)
                ask(a, body)
                exact.append(visible_after(b, body, time.monotonic()))
                if embedder != "none":
                    question = f"Round {number}: does it support 5G?"
                    ask(a, chat(question, photo))
                    started = time.monotonic()
                    copy = chat(question, reencoded(photo, quality=60))
                    semantic.append(visible_after(b, copy, started))
            time.sleep(2.0)  # let the last writes and syncs settle before the idle window
            before = {r.name: r.cpu_seconds() for r in replicas}
            time.sleep(idle)
            idle_share = {r.name: (r.cpu_seconds() - before[r.name]) / idle for r in replicas}
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return {"exact": exact, "semantic": semantic, "idle": idle_share}


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    return (
        f"p50 {c.percentile(ordered, 50) * 1000:.0f} ms, p99 "
        f"{c.percentile(ordered, 99) * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="new questions asked of replica A")
    parser.add_argument("--idle", type=float, default=30.0, help="idle seconds for the CPU reading")
    parser.add_argument(
        "--embedder", default="efficientnet-lite0", help="embedder of both replicas"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = parser.parse_args()

    load = c.wait_for_quiet(0.3, 120)
    started = time.monotonic()
    figures = measure(args.rounds, args.idle, args.embedder)
    exact: list[float] = figures["exact"]  # type: ignore[assignment]
    semantic: list[float] = figures["semantic"]  # type: ignore[assignment]
    idle: dict[str, float] = figures["idle"]  # type: ignore[assignment]
    facts = c.machine_facts()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    worst_p99 = max(c.percentile(sorted(v), 99) for v in (exact, semantic) if v)
    worst_idle = max(idle.values())
    lines = [
        f"Command: `{shlex.join([sys.executable, *sys.argv])}` (repo root), {now}, "
        f"{time.monotonic() - started:.0f} s in all. Code measured: "
        f"{c.describe_source(REPO_ROOT)}. Machine: {facts['nproc']} cores ({facts['cpu']}), "
        f"Python {facts['python']}, PostgreSQL on 127.0.0.1; other processes kept "
        f"{load:.2f} cores busy before the run. Defaults: `--sync-interval 0.5`, the writer "
        f"commits a new entry within 0.1 s. Embedder: {args.embedder}.",
        "",
        "| measure | figure | target | verdict |",
        "|---|---|---|---|",
        f"| exact answer of A served by B ({len(exact)} rounds) | {summary(exact)} | p99 <= 1 s "
        f"| {c.verdict(c.percentile(sorted(exact), 99) <= VISIBILITY_TARGET)} |",
    ]
    if semantic:
        lines.append(
            f"| near-duplicate of A's picture a semantic hit on B ({len(semantic)} rounds) "
            f"| {summary(semantic)} | p99 <= 1 s "
            f"| {c.verdict(c.percentile(sorted(semantic), 99) <= VISIBILITY_TARGET)} |"
        )
    for name, share in sorted(idle.items()):
        lines.append(
            f"| {name} idle for {args.idle:.0f} s: CPU | {share * 100:.2f}% of one core "
            f"| < 2% | {c.verdict(share < IDLE_TARGET)} |"
        )
    lines.append("")
    lines.append(
        f"Worst p99 visibility {worst_p99 * 1000:.0f} ms = {worst_p99 / VISIBILITY_TARGET:.2f}x "
        f"the 1 s budget; worst idle replica {worst_idle * 100:.2f}% of a core = "
        f"{worst_idle / IDLE_TARGET:.2f}x the 2% budget."
    )
    c.publish(TITLE, "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
