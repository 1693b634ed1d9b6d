"""Miss path, paired A/B: two source trees of vlcache side by side, in alternating short blocks.

Run from the repo root: ``.venv/bin/python bench/miss_ab.py --old DIR`` (about 6 minutes
with the defaults), where ``DIR`` is another source tree, e.g. ``git worktree add /tmp/old
<commit> --detach``; ``--new`` defaults to this checkout.

Why paired: the 2-core machines here change speed by up to 2x within minutes (a noisy
neighbour: the same code measured 0.7 ms and 1.8 ms of miss overhead ten minutes apart), so two
whole ``exact_hit.py --tree`` runs compare two moments more than two versions. Here both
versions run at once (each its own ``vlcache serve`` at WARNING with a fresh data directory,
``--embedder none``, one shared upstream double) and each block measures, back to back: the
double directly, then both versions (in alternating order), each with the two miss workloads of
``exact_hit.py`` (the same photo with a new question per request; the same question with a new
photo per request). A version's overhead in a block is its 1-client p50 minus the direct p50
of that block; the verdict is the median over blocks of the paired difference, old minus new,
with its CPU per miss likewise.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import exact_hit as eh

TITLE = "Miss path, paired A/B"
WORKLOADS = ("same photo, new question", "new photo, same question")


@dataclass(frozen=True)
class Block:
    """One version, one workload, one block: overhead over the block's direct p50, CPU."""

    version: str
    workload: str
    overhead_us: float
    cpu_us: float


class Runner:
    """wrk scripts with run numbers of their own, so that no body repeats across runs."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.runs = 0

    def p50(self, server: c.Server, body: c.Body, requests: int, expect: str | None) -> float:
        """1-client p50 (µs) of ``requests`` sequential requests, every answer checked."""
        self.runs += 1
        raw = self.work_dir / f"times{self.runs:03d}"
        script = c.write_lua(
            self.work_dir,
            f"run{self.runs:03d}",
            body,
            path=eh.CHAT_PATH,
            limit=requests,
            expect_cache=expect,
            run=self.runs,
            raw_path=raw,
        )
        run = c.run_wrk(server.url, script, connections=1, seconds=300)
        if run.failed or (expect is not None and run.matched != run.requests):
            raise RuntimeError(
                f"{server.name}: {run.matched}/{run.requests} {expect}, {run.errors}"
            )
        return c.percentile(sorted(c.read_times(raw)), 50)


def measure(args: argparse.Namespace) -> tuple[list[Block], list[float]]:
    """Every block of both versions, and the direct p50 of each block."""
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    blocks: list[Block] = []
    directs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vlcache-miss-ab-") as tmp:
        work_dir = Path(tmp)
        workload = eh.make_workload(work_dir)
        bodies = dict(zip(WORKLOADS, (workload.varying, workload.new_photo), strict=True))
        runner = Runner(work_dir)
        with (
            c.Processes(work_dir) as shared,
            c.Processes(work_dir, trees["old"]) as old_procs,
            c.Processes(work_dir, trees["new"]) as new_procs,
        ):
            port = c.free_port()
            upstream = shared.start(
                "upstream", c.python_runner("serve_standin", port), port, ready_path=c.CALLS_PATH
            )
            servers = {}
            for version, procs in (("old", old_procs), ("new", new_procs)):
                port = c.free_port()
                argv = [
                    c.tool("vlcache"), "serve", "--upstream", upstream.url, "--port", str(port),
                    "--data-dir", str(work_dir / f"data-{version}"), "--log-level", "WARNING",
                    *eh.extra_serve_args("auto", c.tool("vlcache"), trees[version]),
                ]  # fmt: skip
                servers[version] = procs.start(version, argv, port, ready_path="/v1/models")
            for server in servers.values():  # warm-up: pools, caches, the first entries
                for body in bodies.values():
                    runner.p50(server, body, 200, "MISS")
            for n in range(args.blocks):
                with c.timed(f"block {n + 1} of {args.blocks}"):
                    direct = runner.p50(upstream, workload.fixed, args.requests, None)
                    directs.append(direct)
                    for version in ("old", "new") if n % 2 == 0 else ("new", "old"):
                        server = servers[version]
                        for name, body in bodies.items():
                            cpu_before = server.cpu_seconds()
                            p50 = runner.p50(server, body, args.requests, "MISS")
                            cpu = (server.cpu_seconds() - cpu_before) / args.requests * 1e6
                            blocks.append(Block(version, name, p50 - direct, cpu))
    return blocks, directs


def report(args: argparse.Namespace, blocks: list[Block], directs: list[float], took: float) -> str:
    """The markdown section: command, versions, per-workload medians and paired differences."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    facts = c.machine_facts()
    lines = [
        f"Command: `{shlex.join([sys.executable, *sys.argv])}` (repo root), {now}, "
        f"{took:.0f} s in all. Old: {c.describe_source(args.old.resolve())}; new: "
        f"{c.describe_source(args.new.resolve())}. Machine: {facts['nproc']} cores "
        f"({facts['cpu']}), Python {facts['python']}, aiohttp {facts['aiohttp']}.",
        "",
        f"{args.blocks} blocks; in each, the double directly, then old and new (alternating "
        f"order), {args.requests} sequential 1-client misses per version and workload; the "
        f"direct p50 ranged {min(directs) / 1000:.2f}-{max(directs) / 1000:.2f} ms over the "
        "blocks. Overhead = a version's p50 minus the block's direct p50.",
        "",
        "| workload | old overhead p50, median (range) | new overhead p50, median (range) "
        "| old - new, paired: median (mean) | CPU per miss old -> new, median "
        "| old - new CPU, paired median |",
        "|---|---|---|---|---|---|",
    ]
    for workload in WORKLOADS:
        old = [b for b in blocks if b.version == "old" and b.workload == workload]
        new = [b for b in blocks if b.version == "new" and b.workload == workload]
        gains = [o.overhead_us - n.overhead_us for o, n in zip(old, new, strict=True)]
        cpu_gains = [o.cpu_us - n.cpu_us for o, n in zip(old, new, strict=True)]

        def spread(side: list[Block]) -> str:
            values = [b.overhead_us / 1000 for b in side]
            return f"{statistics.median(values):.2f} ms ({min(values):.2f}-{max(values):.2f})"

        lines.append(
            f"| {workload} | {spread(old)} | {spread(new)} "
            f"| {statistics.median(gains):+.0f} µs ({statistics.mean(gains):+.0f}) "
            f"| {statistics.median(b.cpu_us for b in old):,.0f} -> "
            f"{statistics.median(b.cpu_us for b in new):,.0f} µs "
            f"| {statistics.median(cpu_gains):+.0f} µs |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure, print, and write the section to bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the source tree to compare with")
    parser.add_argument(
        "--new", type=Path, default=c.REPO_ROOT, help="the source tree measured against --old "
        "(default: this checkout)",
    )  # fmt: skip
    parser.add_argument("--blocks", type=int, default=10, help="paired blocks")
    parser.add_argument("--requests", type=int, default=400, help="misses per version, workload")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait at start for other processes to leave the CPUs alone",
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    c.ensure_wrk()
    c.wait_for_quiet(0.25, args.quiet_wait)
    blocks, directs = measure(args)
    c.publish(
        TITLE, report(args, blocks, directs, time.perf_counter() - started), write=not args.no_write
    )


if __name__ == "__main__":
    main()
