"""The whole performance suite, one command: every benchmark in turn, then a summary section.

    .venv/bin/python bench/suite.py            # from the repo root; ~40-60 min here
    .venv/bin/python bench/suite.py --only replicas,stream_coalesce

Each benchmark runs as its own process with the arguments below and rewrites its own section of
``bench/RESULTS.md`` (with its command, date, machine and figures); this script adds the "Suite"
section: which code, machine and versions were measured, each benchmark's command, how long it
took and whether it finished. The quality set (real photos from Debian packages) is built first
when it is missing, into ``~/.cache/vlcache-bench/quality``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import time
from pathlib import Path

import _common as c

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TITLE = "Suite (issue 6)"

# name -> (argv after the interpreter, what it measures)
BENCHMARKS: dict[str, tuple[list[str], str]] = {
    "exact_hit": (
        ["bench/exact_hit.py", "--quiet-wait", "120"],
        "exact hit and novel miss vs the upstream directly and a floor server; py-spy profile",
    ),
    "semantic_perf": (
        ["bench/semantic_perf.py"],
        "semantic hit (EfficientNet-Lite0 and CLIP ViT-B/32), micro-batching, novel miss",
    ),
    "stream_coalesce": (
        ["bench/stream_coalesce.py", "--quiet-wait", "120"],
        "streaming miss/hit vs direct; 50 identical misses -> upstream calls",
    ),
    "warmup_speed": (
        ["bench/warmup_speed.py", "--max-wait", "300"],
        "warm-up throughput vs the embedder's own",
    ),
    "index_1m": (["bench/index_1m.py"], "FAISS index at 1M vectors: search, memory, start-up"),
    "replicas": (
        ["bench/replicas.py"],
        "two replicas on PostgreSQL: cross-replica visibility, idle sync CPU",
    ),
    "vs_gptcache": (
        ["bench/vs_gptcache.py", "--quiet-wait", "300"],
        "vlcache vs GPTCache, same embedder and workload: latency, throughput, hit rate",
    ),
    "quality": (
        ["-m", "bench.quality.harness", "--results"],
        "recall and false hits on the real-photo quality set",
    ),
}


def ensure_quality_set() -> None:
    """Build the real-photo set (Debian packages, outside the repo) when it is missing."""
    if (Path.home() / ".cache" / "vlcache-bench" / "quality").is_dir():
        return
    print("suite: building the quality set (apt-get download + dpkg -x) ...", flush=True)
    subprocess.run([PYTHON, "-m", "bench.quality.dataset"], cwd=REPO_ROOT, check=True)


def run(name: str) -> tuple[str, float, int]:
    argv, _ = BENCHMARKS[name]
    command = [PYTHON, *argv]
    print(f"\nsuite: {name}: {shlex.join(command)}", flush=True)
    started = time.monotonic()
    code = subprocess.run(command, cwd=REPO_ROOT).returncode
    return shlex.join(command), time.monotonic() - started, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}", default=""
    )
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"suite: unknown benchmarks: {', '.join(unknown)}")
    if {"quality", "vs_gptcache", "warmup_speed"} & set(names):
        ensure_quality_set()
    began = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    source = c.describe_source(REPO_ROOT)
    results = [(name, *run(name)) for name in names]
    facts = c.machine_facts()
    lines = [
        f"Command: `{shlex.join([PYTHON, *sys.argv])}` (repo root), started {began}. Code "
        f"measured: {source}. Machine: {facts['nproc']} cores ({facts['cpu']}), Linux "
        f"{facts['kernel']}, Python {facts['python']}, aiohttp {facts['aiohttp']}, wrk "
        f"{facts['wrk']}. Each benchmark's own section above has its figures, targets and "
        "how quiet the machine was while it ran.",
        "",
        "| benchmark | measures | command | minutes | finished |",
        "|---|---|---|---:|---|",
    ]
    for name, command, seconds, code in results:
        finished = "yes" if code == 0 else f"**no (exit {code})**"
        lines.append(
            f"| {name} | {BENCHMARKS[name][1]} | `{command}` | {seconds / 60:.1f} | {finished} |"
        )
    c.publish(TITLE, "\n".join(lines), write=True)
    if any(code for *_, code in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
