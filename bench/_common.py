"""Shared machinery of the benchmarks: server processes, ports, wrk, py-spy and RESULTS.md.

Every server a benchmark measures runs in its own process (started by ``Processes``, stopped by it
on any exit, errors and signals included); the load comes from ``wrk`` in yet another process.
The upstream double and the floor server are small runner functions of this module, started as
``python -c "import _common; _common.serve_standin(PORT)"`` so no benchmark imports them in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
CALLS_PATH = "/_bench/calls"
PROFILE_RATE = 200

_RESULTS_HEADER = """# Benchmark results

Measurements of vlcache made by the scripts in `bench/`, one section per benchmark. Each section is
rewritten by its script (`.venv/bin/python bench/<name>.py` from the repo root) and states the
command, the date, the machine and the figures; a `### Notes` part under a section is kept across
reruns (written by hand).
"""


# --- processes --------------------------------------------------------------------------------


T = TypeVar("T")


def on_own_thread(function: Callable[[], T]) -> T:
    """``function()`` on a thread that ends with it.

    A thread that ran torch work keeps an OpenMP team of workers while it lives, and with a
    second team beside the one of the thread that embeds, both run torch ~1.6x slower on 2 cores
    (``embeddings.embedder._load``). The benchmarks' own torch work runs this way, so that what
    they measure runs, as in vlcache, with the only team alive.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="bench-torch") as thread:
        return thread.submit(function).result()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python_runner(function: str, *args: object) -> list[str]:
    """The argv running ``_common.<function>(*args)`` in a fresh interpreter."""
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import _common; "
        f"_common.{function}(*{args!r})"
    )
    return [sys.executable, "-c", code]


def tool(name: str) -> str:
    """The path of a console script of this virtualenv (``vlcache``, ``py-spy``), else PATH's."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"bench: {name!r} is not installed (pip install it into this venv)")
    return found


@dataclass
class Server:
    """One server process listening on 127.0.0.1:port; its output goes to ``log_path``."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (all its threads)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server printed."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise with the server's last output when it has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
            )


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def background_load(seconds: float = 1.0) -> float:
    """Cores kept busy by everything on the machine over the next ``seconds`` (nothing of ours
    runs yet when this is called: it is the load of other people's processes)."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - before) / seconds


def wait_for_quiet(limit: float, max_wait: float) -> float:
    """Wait up to ``max_wait`` seconds for the background load to drop under ``limit`` cores."""
    deadline = time.monotonic() + max_wait
    load = background_load()
    while load > limit and time.monotonic() < deadline:
        print(
            f"bench: {load:.2f} cores busy with other processes; waiting for < {limit:g} ...",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(4.0)
        load = background_load()
    return load


class Processes(contextlib.AbstractContextManager["Processes"]):
    """Starts server processes and stops every one of them on exit, whatever the exit."""

    def __init__(self, log_dir: Path, source: Path = REPO_ROOT) -> None:
        self._log_dir = log_dir
        # Children run in ``source`` with it first on PYTHONPATH: that tree's proxy/ and store/
        # are the ones measured (the venv's editable install only comes after it).
        self._source = source
        self._servers: list[Server] = []
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Processes:
        # SIGTERM/SIGHUP become SystemExit so the ``with`` block unwinds and stops the servers.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            self._previous[signum] = signal.signal(signum, _exit_on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in reversed(self._servers):
            stop(server)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        *,
        ready_path: str = "/",
        timeout: float = 30.0,
    ) -> Server:
        """Start ``argv`` (listening on ``port``) and wait until it answers HTTP."""
        log_path = self._log_dir / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(self._source), env.get("PYTHONPATH", "")) if p
        )
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self._source,
                env=env,
                start_new_session=True,  # its own process group: stopped as one, by its id
            )
        server = Server(name, port, process, log_path)
        self._servers.append(server)
        wait_ready(server, ready_path, timeout)
        return server

    def cpu_seconds(self) -> float:
        """CPU time used so far by every server still running."""
        total = 0.0
        for server in self._servers:
            with contextlib.suppress(OSError, ValueError):
                total += server.cpu_seconds()
        return total

    def stop(self, server: Server) -> None:
        """Stop one server now (it is not stopped twice)."""
        stop(server)
        self._servers.remove(server)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def stop(server: Server, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds."""
    if server.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.process.wait()


def wait_ready(server: Server, path: str, timeout: float) -> None:
    """Poll ``GET path`` until the server answers with any HTTP status."""
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            http_get(server.port, path, timeout=1.0)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.name} did not answer on port {server.port} within {timeout:.0f} s:"
                    f"\n{server.log_tail()}"
                ) from None
            time.sleep(0.05)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of ``GET http://127.0.0.1:port/path``."""
    status, _, body = http_request(port, "GET", path, timeout=timeout)
    return status, body


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# --- servers run in their own processes ----------------------------------------------------------


def serve_standin(port: int, latency: float = 0.0) -> None:
    """Run ``proxy.standin.StandIn`` with ``run_counted`` (in this process, until SIGTERM)."""
    from proxy.standin import StandIn

    run_counted(StandIn(latency=latency), port)


def run_counted(standin: Any, port: int) -> None:
    """Run a ``proxy.standin.StandIn`` (or a subclass) on 127.0.0.1:port, until SIGTERM.

    ``GET /_bench/calls`` answers ``{"posts": N}``, the POSTs (model runs) seen so far. The
    stand-in's own record of calls is emptied after every request: it keeps whole bodies, and a
    throughput run would otherwise hold gigabytes of them.
    """
    from aiohttp import web

    posts = 0

    @web.middleware
    async def count_calls(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal posts
        if request.path == CALLS_PATH:
            return web.json_response({"posts": posts})
        try:
            return await handler(request)
        finally:
            posts += len(standin.chat_calls)
            standin.calls.clear()

    app = standin.app()
    app.middlewares.append(count_calls)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


FLOOR_ANSWER = json.dumps(
    {
        "id": "chatcmpl-floor",
        "object": "chat.completion",
        "created": 1767225600,
        "model": "qwen3-vl-8b-instruct",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A fixed answer of the floor server."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240},
    }
).encode()


def serve_floor(port: int) -> None:
    """The floor: read the whole request body, answer a fixed small JSON (until SIGTERM)."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=FLOOR_ANSWER, content_type="application/json")

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def upstream_posts(port: int) -> int:
    """How many POSTs the stand-in on ``port`` has answered."""
    status, body = http_get(port, CALLS_PATH)
    if status != 200:
        raise RuntimeError(f"GET {CALLS_PATH} answered {status}")
    return int(json.loads(body)["posts"])


# --- wrk ---------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """The path of ``wrk``; installs the Debian package when missing and root, else exits."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: wrk is missing, installing the Debian package ...", file=sys.stderr)
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            subprocess.run(argv, check=False, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit(
        "bench: wrk (the HTTP load generator) is required: install it with "
        "`apt-get update && apt-get install -y wrk` (Debian/Ubuntu) and run again"
    )


# The pieces every benchmark's wrk script shares (``write_lua`` here, ``bench/wrk_cycle.py``):
# reading a file, wrk's headers, numbering the threads, the clock for raw per-request times, the
# end after LIMIT answers (each thread counts the answers it wanted in ``matched``) and the
# summary line ``done`` prints (see ``WrkRun``). Markers ``__NAME__`` are replaced by the writer.
WRK_LUA_HEAD = r"""
local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

wrk.method = "POST"
wrk.path = "__PATH__"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
local LIMIT = __LIMIT__
local EXPECT = __EXPECT__
local RAW = __RAW__

local threads = {}
function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

-- RAW: each request's time, from building it (just before wrk writes it) to its complete
-- answer, on CLOCK_MONOTONIC. wrk's own histogram is "corrected" for coordinated omission: one
-- 100 ms stall among 1.5 ms requests becomes ~65 synthetic samples, which is not what a
-- sequential client saw.
local now_us, sent_at, times
if RAW then
  local ffi = require("ffi")
  ffi.cdef("typedef struct { long sec; long nsec; } bench_ts; int clock_gettime(int, bench_ts *);")
  local ts = ffi.new("bench_ts")
  now_us = function()
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.sec) * 1000000 + tonumber(ts.nsec) / 1000
  end
  times = {}
end

counter = 0
seen = 0
matched = 0

-- After LIMIT answers: write the raw times, stop. wrk's main thread sleeps for the whole -d
-- duration and only a SIGINT ends that sleep; it must reach the main thread, so it is sent (and
-- repeated) once this thread has stopped.
local function stop_at_limit()
  if LIMIT > 0 and seen == LIMIT then
    if RAW then
      local out = assert(io.open(RAW .. "." .. id, "w"))
      for i = 1, #times do out:write(string.format("%.1f\n", times[i])) end
      out:close()
    end
    wrk.thread:stop()
    local stat = assert(io.open("/proc/self/stat", "r"))
    local pid = stat:read("*n")
    stat:close()
    os.execute("(for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.05; " ..
               "kill -INT " .. pid .. " 2>/dev/null || exit 0; done) &")
  end
end
"""
WRK_LUA_DONE = r"""
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + (t:get("matched") or 0) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "matched": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"mean_us": %.1f, "max_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"p999_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, total,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""

_WRK_LUA = (
    "-- Generated by bench/_common.py: POST a fixed body, or a body that varies per request."
    + WRK_LUA_HEAD
    + r"""
local VARY = __VARY__
local TAG = "__TAG__"
local DIGITS = __DIGITS__
local RUN = __RUN__
local prefix, suffix
if VARY then
  prefix = slurp("__PREFIX__")
  suffix = slurp("__SUFFIX__")
else
  wrk.body = slurp("__BODY__")
end

local static_request
function init(args)
  if not VARY then static_request = wrk.format() end
end

if VARY or RAW then
  request = function()
    local built
    if VARY then
      counter = counter + 1
      local unique
      if DIGITS then
        unique = string.format("%04d%02d%010d", RUN % 10000, id % 100, counter)
      else
        unique = TAG .. "-" .. id .. "-" .. counter
      end
      built = wrk.format(nil, nil, nil, prefix .. unique .. suffix)
    else
      built = static_request
    end
    if RAW then sent_at = now_us() end
    return built
  end
end
if LIMIT > 0 or EXPECT or RAW then
  response = function(status, headers, body)
    seen = seen + 1
    if RAW then times[seen] = now_us() - sent_at end
    if EXPECT and headers["X-Cache"] == EXPECT then matched = matched + 1 end
    stop_at_limit()
  end
end
"""
    + WRK_LUA_DONE
)


@dataclass(frozen=True)
class Body:
    """A request body: fixed, or ``prefix + <unique tag> + suffix`` per request.

    With ``digits`` the unique tag is 16 decimal digits (run, thread, counter), so that it can
    stand inside base64 text: 16 characters decode to 12 bytes.
    """

    path: Path | None = None
    prefix: Path | None = None
    suffix: Path | None = None
    digits: bool = False

    @property
    def varies(self) -> bool:
        """Whether every request gets a different body."""
        return self.path is None


@dataclass(frozen=True)
class WrkRun:
    """What one wrk run measured (latencies in microseconds)."""

    requests: int
    seconds: float
    errors: dict[str, int]
    matched: int
    mean_us: float
    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    max_us: int
    loadgen_cpu_s: float

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        """Requests that did not get a 2xx/3xx answer, plus socket errors."""
        return sum(self.errors.values())


def write_lua(
    work_dir: Path,
    name: str,
    body: Body,
    *,
    path: str = "/v1/chat/completions",
    limit: int = 0,
    expect_cache: str | None = None,
    tag: str = "",
    run: int = 0,
    raw_path: Path | None = None,
) -> Path:
    """A wrk script POSTing ``body``; ends the run after ``limit`` answers (0: on duration).

    ``limit`` is meant for 1-thread runs: the first thread to reach it ends the whole run.
    With ``raw_path`` (and a ``limit``), thread N writes each request's time in microseconds,
    one a line, to ``<raw_path>.N`` (see ``read_times``). ``run`` tells the digit tags of
    scripts apart (a ``digits`` body repeats its tags in every script of the same ``run``).
    """
    values = {
        "__PATH__": path,
        "__VARY__": "true" if body.varies else "false",
        "__LIMIT__": str(limit),
        "__EXPECT__": f'"{expect_cache}"' if expect_cache else "nil",
        "__TAG__": tag or name,
        "__DIGITS__": "true" if body.digits else "false",
        "__RUN__": str(run),
        "__RAW__": f'"{raw_path}"' if raw_path else "nil",
        "__PREFIX__": str(body.prefix or ""),
        "__SUFFIX__": str(body.suffix or ""),
        "__BODY__": str(body.path or ""),
    }
    text = _WRK_LUA
    for marker, value in values.items():
        text = text.replace(marker, value)
    script = work_dir / f"{name}.lua"
    script.write_text(text)
    return script


def run_wrk(
    url: str,
    script: Path,
    *,
    connections: int,
    threads: int = 1,
    seconds: float = 10.0,
    timeout: float = 10.0,
) -> WrkRun:
    """Run wrk against ``url`` and return what its ``done()`` reported."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = start_wrk(
        url, script, connections=connections, threads=threads, seconds=seconds, timeout=timeout
    )
    run = finish_wrk(process, seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return dataclasses.replace(run, loadgen_cpu_s=cpu)


def start_wrk(
    url: str,
    script: Path,
    *,
    connections: int,
    threads: int = 1,
    seconds: float = 10.0,
    timeout: float = 10.0,
) -> subprocess.Popen[str]:
    """Start wrk in the background; ``finish_wrk`` collects it."""
    argv = [
        ensure_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(round(seconds), 1)}s",
        f"--timeout={int(timeout)}s",
        "-s",
        str(script),
        url,
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_wrk(process: subprocess.Popen[str], timeout: float) -> WrkRun:
    """Wait for a wrk started by ``start_wrk`` (killing it past ``timeout``) and read its report."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    match = re.search(r"^BENCH_JSON (.*)$", stdout, re.MULTILINE)
    if process.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{stdout}\n{stderr}")
    data = json.loads(match.group(1))
    return WrkRun(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        errors=data["errors"],
        matched=data["matched"],
        mean_us=data["mean_us"],
        p50_us=data["p50_us"],
        p90_us=data["p90_us"],
        p99_us=data["p99_us"],
        p999_us=data["p999_us"],
        max_us=data["max_us"],
        loadgen_cpu_s=0.0,
    )


def read_times(raw_path: Path, threads: int = 1) -> list[float]:
    """The per-request times (µs) written by a ``raw_path`` wrk script, all threads."""
    times: list[float] = []
    for n in range(1, threads + 1):
        times += [float(v) for v in Path(f"{raw_path}.{n}").read_text().split()]
    return times


def verdict(ok: bool) -> str:
    """PASS or FAIL, as the results tables print it."""
    return "PASS" if ok else "FAIL"


def percentile(ordered: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of sorted values (``share`` in 0-100)."""
    if not ordered:
        return 0.0
    rank = max(int(-(-share * len(ordered) // 100)), 1)  # ceil
    return ordered[min(rank, len(ordered)) - 1]


# --- py-spy ------------------------------------------------------------------------------------


def record_profile(pid: int, seconds: int, output: Path, rate: int = PROFILE_RATE) -> Path:
    """Sample ``pid`` with py-spy for ``seconds`` into a collapsed-stack file (speedscope and
    ``flamegraph.pl`` read it).

    Only the thread holding the GIL is sampled (``--gil``): idle executor and aiosqlite threads
    blocked in ``queue.get`` would otherwise count as busy (py-spy cannot tell that wait from
    work here), and what runs without the GIL (hashlib on large buffers, socket calls) runs beside
    the interpreter rather than in its way. Samples / (rate x seconds) is the GIL's busy share.
    """
    argv = [
        tool("py-spy"),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        str(rate),
        "--gil",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    subprocess.run(argv, check=True, capture_output=True, timeout=seconds + 60)
    return output


@dataclass(frozen=True)
class Profile:
    """Collapsed stacks of one py-spy recording, summed."""

    samples: int
    by_thread: Counter[str]
    self_time: Counter[str]
    total_time: Counter[str]
    stacks: Counter[tuple[str, ...]]


def read_profile(path: Path) -> Profile:
    """Sum a collapsed-stack file: samples per thread, per function (self and inclusive)."""
    by_thread: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    stacks: Counter[tuple[str, ...]] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        thread, frames = frames[0], [_short_frame(f) for f in frames[1:]]
        samples += count
        by_thread[_thread_kind(thread, frames)] += count
        stacks[tuple(frames)] += count
        if frames:
            self_time[frames[-1]] += count
        for frame in set(frames):
            total_time[frame] += count
    return Profile(samples, by_thread, self_time, total_time, stacks)


def _short_frame(frame: str) -> str:
    """``name (path/to/file.py:12)`` -> ``name (file.py)``: lines apart, a function is one row."""
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if match is None:
        return frame
    name, file = match.groups()
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file
    return f"{name} ({short})"


def _thread_kind(thread: str, frames: Sequence[str]) -> str:
    """The role of a sampled thread, from py-spy's ``thread (tid): name`` root frame."""
    name = thread.split(": ", 1)[-1]
    if name == "MainThread":
        return "event loop (main thread)"
    if name.startswith("asyncio_"):
        return "default executor threads"
    if "_connection_worker_thread" in name:
        return "aiosqlite thread"
    return f"other threads ({name})"


# --- RESULTS.md --------------------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    """nproc, CPU model, Python, aiohttp and wrk versions, kernel."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import aiohttp

    wrk = shutil.which("wrk")
    wrk_version = "absent"
    if wrk:
        head = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        wrk_version = head.split(" [")[0].removeprefix("wrk ")
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "wrk": wrk_version,
        "kernel": platform.release(),
    }


def describe_source(source: Path) -> str:
    """Which code a run measured: the git commit of ``source``, and whether it had local edits."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(source), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit or Path(git("rev-parse", "--show-toplevel") or "/") != source.resolve():
        return f"source tree `{source}` (not a git checkout)"
    edited = git("status", "--porcelain", "--", "proxy", "store", "embeddings")
    suffix = " with uncommitted edits in proxy/store/embeddings" if edited else ""
    return f"commit {commit}{suffix}"


def replace_section(title: str, text: str, path: Path = RESULTS) -> None:
    """Write ``## title`` + ``text`` into ``path``, replacing that section, keeping its Notes."""
    content = path.read_text() if path.exists() else _RESULTS_HEADER
    heading = f"## {title}"
    lines = content.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    notes = ""
    if start is None:
        before, after = content.rstrip("\n") + "\n\n", ""
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        old = "".join(lines[start:end])
        notes_at = old.find("\n### Notes")
        if notes_at >= 0:
            notes = old[notes_at + 1 :].rstrip("\n") + "\n"
        before, after = "".join(lines[:start]), "".join(lines[end:])
    section = f"{heading}\n\n{text.strip()}\n"
    if notes:
        section += "\n" + notes
    if after:
        section += "\n"
    path.write_text(before + section + after)


@contextlib.contextmanager
def timed(label: str) -> Iterator[None]:
    """Print how long a step took (to stderr)."""
    started = time.perf_counter()
    print(f"bench: {label} ...", file=sys.stderr, flush=True)
    yield
    print(
        f"bench: {label} done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True
    )


def publish(title: str, text: str, *, write: bool) -> None:
    """Print a benchmark's section and, unless told not to, put it into bench/RESULTS.md."""
    print(f"## {title}\n\n{text}")
    if write:
        replace_section(title, text)
        print(f"\nbench: written to {RESULTS.relative_to(REPO_ROOT)}", file=sys.stderr)
