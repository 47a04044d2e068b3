"""Does a node stay healthy under steady verification load: no memory leak, a stable p99, no errors?

    .venv/bin/python bench/soak.py                                # full: 10 minutes at half the capacity
    .venv/bin/python bench/soak.py --duration 10 --interval 1 --warmup 2 --capacity-seconds 2   # smoke, ~25 s
    .venv/bin/python bench/soak.py --url http://127.0.0.1:8080 --root-key unkey_root_... [--pid <serve pid>]

1. Starts `keysvc serve --workers 2` on a fresh data dir with the default settings (analytics on, so the flusher
   runs and chDB ingests every verification), or uses the server at --url (whose root key must hold
   api.*.create_api, api.*.create_key and api.*.verify_key; RSS is sampled only if --pid names its `keysvc
   serve` process). Creates an API and a key like bench/http.py's (one auto-applied ratelimit that never denies,
   credits that never run out), so that every verification writes the counters.
2. Capacity: a closed-loop run of wrk (`-t1 -c32`, bench/http.py's Lua script and parser) for
   --capacity-seconds after a 2 s warm-up; its req/s is the capacity (or give --capacity to skip this).
   Then the same-rate baseline (--baseline-seconds, default 120; 0 skips it): bench/http.py's ceiling, the raw
   ASGI app under the same Granian flags and worker count, soaked by the same generator at the soak's rate,
   with keysvc idle meanwhile; its interval p99s show what this machine and generator give a server that does
   no work, and the verdict shows keysvc's median interval p99 over the ceiling's (not judged).
3. Soak: --fraction (default 0.5) of the capacity, for --duration seconds (default 600), from an open-loop
   generator in this process (asyncio on uvloop, raw keep-alive HTTP/1.1 over --connections connections, at
   most one request in flight on each): request i is due at start + i / rate whatever the server does; a due
   request waits for a free connection if there is none, and its latency then counts from when it was due, so a
   stall shows in the latencies rather than slowing the load down (wrk's closed loop would hide it, and wrk2 is
   not installed; wrk with a Lua delay() is still a closed loop, and reports latencies only for the whole run).
   The generator wakes every millisecond and sends what has come due; a request sent at once is timed from its
   sending (the tick is the generator's, not the server's), one that waits is timed from when it was due; the
   table shows how late the generator was at worst. Every answer must be 200 with `"valid":true`; anything
   else, a dropped connection, or a request still unanswered at the end, is an error.
4. Every --interval seconds, one row: requests answered and errors in the interval, the achieved rate, p50/p99/max
   latency of the interval, the p99 of the time the app itself took (from the workers' latency histogram, when
   the soak started the server), the generator's backlog and own CPU, the machine's idle CPU and load average, the
   CPU time of the workers and of the flusher, and the RSS of every process of the node (found by walking /proc
   from the `keysvc serve` process: serve, each worker, the flusher).
5. At the end: credits spent must equal the VALID answers counted (the server really verified), and a verdict,
   on the rows after the first --warmup seconds of load: the anonymous RSS (heap and stacks, where a leak
   lives) of each process flat. Its floor (the minimum of each sixth of the samples after the warm-up, under
   the sawtooth of the flusher's batches) may rise by at most 32 MiB or 20% from the first sixth to the last,
   and by at most 4 MiB over the last half: a leak keeps raising it to the end, a warm-up (caches) stops. Total
   RSS is shown beside it: it also counts the file-backed pages of the LMDB maps and chDB's files, which grow as
   they are touched, up to the files' sizes. Then p99 stable: no drift, the median interval p99 of the last
   third of the rows at most 1.5x that of the first third (a server that degrades, from a growing
   cache, table or backlog, drifts up; the largest interval p99 over the median one is printed beside it, but
   not judged: on a shared VM a stall of the whole machine, which the generator's own lag shows too, sets it).
   And zero errors.

Exit 0 if there were no errors, 1 if there were (or, with --strict, if a verdict failed), 2 if the bench broke.
"""
# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# Run as `python bench/soak.py`, this file's folder comes first on sys.path and bench/http.py would shadow the
# standard library's `http` package: move that folder last before anything imports it.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))  # last: the standard library first, bench/machine.py still found
sys.dont_write_bytecode = True  # no __pycache__ in bench/ for importing the sibling script

import argparse
import asyncio
import collections
import json
import math
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import tempfile
import time
from pathlib import Path
from time import perf_counter
from urllib.parse import urlsplit

from machine import bench_http, cpu_model, keysvc_revision, remove_unless_kept, run_script, version
bh = bench_http()  # bench/http.py's helpers


MiB = 1 << 20
UNANSWERED_GRACE = 10.0  # seconds a request may stay in flight after the load stops
# Flat: the floor of anonymous RSS (see rss_verdict) rises by at most 32 MiB or 20% (whichever is more) from the
# first window after the warm-up to the last, and by at most 4 MiB over the last half. A leak of 8 bytes per
# verification at 7,800 per second grows 37 MB in 10 minutes, half of it in the last half.
RSS_GROWTH_PCT = 20.0
RSS_GROWTH_MIB = 32.0
RSS_LATE_GROWTH_MIB = 4.0
# p99 stable: the median interval p99 of the last third of the run at most this times the first third's.
P99_DRIFT = 1.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


# -- the node's processes ------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(value.split()[0])
    except OSError:
        pass
    try:  # utime + stime of all its threads, in clock ticks (fields 14 and 15, after the command's parentheses)
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        out["cpu_ticks"] = int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        pass
    return out


def node_processes(root: int) -> dict[int, str]:
    """pid -> role, for the serve process and everything below it."""
    roles = {root: "serve"}
    todo = [root]
    while todo:
        for child in children(todo.pop()):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            roles[child] = "flusher" if b"keysvc.analytics" in cmdline else "worker"
            todo.append(child)
    return roles


class Processes:
    """The node's processes, labelled once (serve, worker 1, worker 2, ..., flusher), RSS sampled on demand."""

    def __init__(self, root: int | None) -> None:
        self.root = root
        self.labels: dict[int, str] = {}
        self.events: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        if self.root is None:
            return
        roles = node_processes(self.root)
        gone = [pid for pid in self.labels if pid not in roles]
        for pid in gone:
            self.events.append(f"{self.labels.pop(pid)} (pid {pid}) is gone")
        workers = sum(1 for label in self.labels.values() if label.startswith("worker"))
        for pid in sorted(roles):
            if pid in self.labels:
                continue
            role = roles[pid]
            if role == "worker":
                workers += 1
                label = f"worker {workers}"
            else:
                label = role
            if self.labels and gone:
                self.events.append(f"{label} (pid {pid}) appeared")
            self.labels[pid] = label

    def sample(self) -> dict[str, dict[str, int]]:
        self.refresh()
        return {label: status_kib(pid) for pid, label in self.labels.items()}


# -- the open-loop generator ---------------------------------------------------------------------------


class Latencies:
    """An interval's latencies as counts per bucket of 10 us (100 us from 10 ms on): recording one is a
    dict increment, and the row's percentiles walk a few hundred buckets where sorting the interval's
    ~80,000 samples took the generator's loop tens of milliseconds, a stall that the requests in
    flight then showed as latency of the server's."""

    def __init__(self) -> None:
        self.counts: collections.Counter[int] = collections.Counter()
        self.total = 0
        self.max = float("nan")

    def append(self, ms: float) -> None:
        self.counts[int(ms * 100) if ms < 10 else 1000 + int((ms - 10) * 10)] += 1
        self.total += 1
        if not ms <= self.max:  # also the first one, against nan
            self.max = ms

    def __len__(self) -> int:
        return self.total

    def percentile(self, q: float) -> float:
        """The bucket's upper bound where `q` of the samples are at or below, in ms."""
        if not self.total:
            return float("nan")
        rank = min(self.total - 1, int(q * self.total))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen > rank:
                return (bucket + 1) / 100 if bucket < 1000 else 10 + (bucket - 999) / 10
        return self.max


class Interval:
    def __init__(self) -> None:
        self.latencies = Latencies()  # ms, from when each request was sent (or due, if it had to wait)
        self.lag = 0.0  # s: how late the generator sent the latest of its requests
        self.errors = 0
        self.error_kinds: collections.Counter[str] = collections.Counter()


class Connection(asyncio.Protocol):
    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due: float | None = None  # the due time of the request in flight

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, due: float) -> None:
        self.due = due
        self.transport.write(self.gen.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            at = head.find(b"content-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15:stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                return
            status = int(head[9:12])
            body = bytes(buf[end + 4:total])
            del buf[:total]
            self.gen.answered(self, status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self, exc)


class Generator:
    """Sends `request` at `rate` per second over `connections` keep-alive connections, open loop."""

    def __init__(self, host: str, port: int, request: bytes, rate: float, connections: int) -> None:
        self.host = host
        self.port = port
        self.request = request
        self.rate = rate
        self.size = connections
        self.idle: collections.deque[Connection] = collections.deque()  # FIFO: every connection in use
        self.all: set[Connection] = set()
        self.backlog: collections.deque[float] = collections.deque()
        self.current = Interval()
        self.valid = 0
        self.sent = 0
        self.errors_total = 0
        self.running = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def connect(self) -> None:
        self.loop = asyncio.get_running_loop()
        while len(self.all) < self.size:
            await self._open()

    async def _open(self) -> None:
        _, conn = await self.loop.create_connection(lambda: Connection(self), self.host, self.port)  # type: ignore
        self.all.add(conn)
        self.idle.append(conn)

    def error(self, kind: str) -> None:
        self.current.errors += 1
        self.current.error_kinds[kind] += 1
        self.errors_total += 1

    def answered(self, conn: Connection, status: int, body: bytes) -> None:
        now = perf_counter()
        due, conn.due = conn.due, None
        if due is None:
            self.error("an answer nobody asked for")
            return
        if status != 200:
            self.error(f"HTTP {status}")
        elif b'"valid":true' not in body:
            self.error("not VALID: " + body[:120].decode(errors="replace"))
        else:
            self.valid += 1
            self.current.latencies.append((now - due) * 1000)
        self.next_for(conn)

    def next_for(self, conn: Connection) -> None:
        if self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn: Connection, exc: Exception | None) -> None:
        self.all.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.due is not None:
            self.error(f"connection lost with a request in flight ({exc!r})")
        if self.running:
            self.loop.create_task(self._open())  # type: ignore[union-attr]

    async def run(self, seconds: float, on_tick) -> None:  # noqa: ANN001
        """Send for `seconds`; call on_tick(elapsed) whenever a whole interval has passed (see main).
        Times are time.perf_counter(): uvloop's loop.time() is libuv's cached clock, in whole milliseconds."""
        self.running = True
        start = perf_counter()
        end = start + seconds
        period = 1.0 / self.rate
        issued = 0
        while True:
            now = perf_counter()
            if now >= end:
                break
            while self.backlog and self.idle:  # a connection that came back (a reconnect) takes the oldest
                self.idle.popleft().send(self.backlog.popleft())
            due_count = int((now - start) / period) + 1
            while issued < due_count:
                due = start + issued * period
                issued += 1
                self.sent += 1
                lag = now - due
                if lag > self.current.lag:
                    self.current.lag = lag
                if self.idle and not self.backlog:  # timed from now: the generator's tick (~1 ms) is not the server's
                    self.idle.popleft().send(now)
                else:  # waits for a connection: timed from when it was due, so a stall shows
                    self.backlog.append(due)
            on_tick(now - start)
            await asyncio.sleep(0.001)
        self.running = False
        # What is still due or in flight: answered within the grace period, or an error.
        deadline = perf_counter() + UNANSWERED_GRACE
        while (self.backlog or any(c.due is not None for c in self.all)) and perf_counter() < deadline:
            await asyncio.sleep(0.01)
        for _ in range(len(self.backlog) + sum(1 for c in self.all if c.due is not None)):
            self.error("unanswered at the end")
        on_tick(seconds, final=True)

    def take_interval(self) -> Interval:
        done, self.current = self.current, Interval()
        return done

    def close(self) -> None:
        for conn in list(self.all):
            if conn.transport is not None:
                conn.transport.close()


# -- the report ----------------------------------------------------------------------------------------


def cpu_share(now: dict[str, dict[str, int]], before: dict[str, dict[str, int]], label: str, span: float) -> float:
    """A process's CPU time over the row, as a share of one core (nan if it was not seen both times)."""
    ticks, earlier = now.get(label, {}).get("cpu_ticks"), before.get(label, {}).get("cpu_ticks")
    if ticks is None or earlier is None:
        return float("nan")
    return (ticks - earlier) / CLOCK_TICKS / span


def percent(share: float | None) -> str:
    return "-" if share is None or math.isnan(share) else f"{share:.0%}"


def app_p99_cell(ms: float) -> str:
    return "-" if math.isnan(ms) else f"<= {fmt_ms(ms)}"


def fmt_ms(ms: float) -> str:
    if ms != ms:  # nan
        return "-"
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def mib(kib: dict[str, int] | None) -> str:
    """A process's 'RSS/anonymous RSS' in MiB."""
    if not kib or "VmRSS" not in kib:
        return "-"
    return f"{kib['VmRSS'] / 1024:.0f}/{kib.get('RssAnon', 0) / 1024:.0f}"


WINDOWS = 6  # the samples after the warm-up are cut into this many windows; a window's floor is its minimum


def floors(values: list[float]) -> list[float]:
    """The minimum of each of WINDOWS consecutive windows of the values: the floor under the sawtooth of a
    process that allocates and frees in batches (the flusher), which a leak raises and a sawtooth does not."""
    count = min(WINDOWS, len(values))
    return [min(values[i * len(values) // count:(i + 1) * len(values) // count]) for i in range(count)]


def p99_thirds(p99s: list[float]) -> tuple[float, float]:
    """The median interval p99 of the first and of the last third of the rows (all of them for fewer than 3)."""
    if not p99s:
        return float("nan"), float("nan")
    third = max(1, len(p99s) // 3)
    return statistics.median(p99s[:third]), statistics.median(p99s[-third:])


def rss_verdict(samples: list[tuple[float, dict[str, dict[str, int]]]], warmup: float
                ) -> tuple[list[str], bool]:
    """Per process: RSS from the first sample after the warm-up to the last, total and anonymous, and the floor
    of the anonymous part (floors) over those samples: how it rose from the first window to the last, and over
    the last half (from the window that starts it to the last). The verdict is on the anonymous part (heap,
    stacks: where a leak lives), by the RSS_* thresholds: a leak keeps raising the floor to the end, a warm-up
    (caches, arenas) stops. The rest of RSS is file-backed pages: the LMDB maps (store, counters, spool: shared
    by the processes, counted in each one's RSS as it touches them) and chDB's files, bounded by the files' sizes
    and reclaimable by the kernel, so shown but not judged."""
    after = [(t, s) for t, s in samples if t >= warmup] or samples[-1:]
    if len(after) < 2:
        return ["not enough samples after the warm-up to judge RSS"], True
    lines = []
    ok = True
    first, last = after[0][1], after[-1][1]
    for label in last:
        if label not in first:
            lines.append(f"| {label} | (appeared during the run) | | | | |")
            continue
        rss0, rss1 = first[label].get("VmRSS", 0) / 1024, last[label].get("VmRSS", 0) / 1024
        anon = [s[label].get("RssAnon", 0) / 1024 for _, s in after if label in s]
        floor = floors(anon)
        growth = floor[-1] - floor[0]
        late = floor[-1] - floor[len(floor) // 2]
        flat = growth <= max(RSS_GROWTH_MIB, floor[0] * RSS_GROWTH_PCT / 100) and late <= RSS_LATE_GROWTH_MIB
        ok &= flat
        lines.append(f"| {label} | {rss0:.1f} -> {rss1:.1f} MiB ({rss1 - rss0:+.1f}) | "
                     f"{anon[0]:.1f} -> {anon[-1]:.1f} MiB (min {min(anon):.1f}, max {max(anon):.1f}) | "
                     f"{' '.join(f'{f:.0f}' for f in floor)} | {growth:+.1f} MiB | {late:+.1f} MiB | "
                     f"{'flat' if flat else 'GROWS'} |")
    return lines, ok


class IdleCpu:
    """The machine's idle share of CPU time since the last call, from /proc/stat (idle and iowait over all
    the time counted): 0% means every core was busy, so a request's wait for one shows in its latency."""

    def __init__(self) -> None:
        self.last = self.read()

    @staticmethod
    def read() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)

    def fraction(self) -> float:
        now, before = self.read(), self.last
        self.last = now
        total = now[1] - before[1]
        return (now[0] - before[0]) / total if total > 0 else float("nan")


class AppLatency:
    """keys.verifyKey's time inside the app, per row, from the workers' own histogram
    (keysvc_verify_duration_seconds, read from the metrics files under the data dir): the upper bound
    of the bucket that holds the row's 99th percentile. The app's clock starts when Granian hands it the
    request and stops at the answer, so it holds a wait for the counters' lock or for a batch, but not time
    queued before the app (in the kernel, in Granian, behind a busy event loop) nor the generator's own
    delays: a generator p99 far above it was spent outside the app's code."""

    PREFIX = "keysvc_verify_duration_seconds_bucket{"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.last = self.read()

    def read(self) -> dict[float, float]:
        from keysvc import metrics

        buckets: dict[float, float] = {}
        for line in metrics.render(str(self.data_dir)).decode().splitlines():
            if line.startswith(self.PREFIX):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(le)] = float(line.rsplit(" ", 1)[1])
        return buckets

    def p99_ms(self) -> float:
        """The bucket bound for the answers since the last call (nan if none)."""
        now, before = self.read(), self.last
        self.last = now
        cumulative = sorted((le, count - before.get(le, 0.0)) for le, count in now.items())
        total = cumulative[-1][1] if cumulative else 0.0  # the +Inf bucket
        if total <= 0:
            return float("nan")
        return next(le for le, count in cumulative if count >= 0.99 * total) * 1000


class Baseline:
    """The same-rate soak of the raw ASGI ceiling: what this machine and this generator give a server that
    does no work, measured in the same run as keysvc's soak."""

    def __init__(self, seconds: float, workers: int) -> None:
        self.seconds = seconds
        self.workers = workers
        self.p99s: list[float] = []
        self.lag = 0.0
        self.errors = 0

    async def run(self, host: str, port: int, request: bytes, rate: float, connections: int, interval: float) -> None:
        gen = Generator(host, port, request, rate, connections)
        await gen.connect()
        state = {"next": interval}

        def on_tick(elapsed: float, final: bool = False) -> None:
            if final or elapsed < state["next"]:
                return
            done = gen.take_interval()
            self.p99s.append(done.latencies.percentile(0.99))
            self.lag = max(self.lag, done.lag)
            state["next"] += interval

        try:
            await gen.run(self.seconds, on_tick)
        finally:
            gen.close()
        self.errors = gen.errors_total

    def measured(self) -> list[float]:
        """The intervals' p99s, but for intervals without an answer (nan)."""
        return [p for p in self.p99s if p == p]

    def median_p99(self) -> float:
        p99s = self.measured()
        return statistics.median(p99s) if p99s else float("nan")

    def line(self, rate: float, connections: int) -> str:
        p99s = self.measured() or [float("nan")]
        return (f"same-rate baseline: the raw ASGI ceiling (bench/raw_asgi.py, http.py's Granian flags, "
                f"{self.workers} workers) soaked first by the same generator, {rate:,.0f} req/s over {connections} "
                f"connections for {self.seconds:g} s: interval p99 min / median / max {fmt_ms(min(p99s))} / "
                f"{fmt_ms(self.median_p99())} / {fmt_ms(max(p99s))} ms, gen lag at most {fmt_ms(self.lag * 1000)} ms, "
                f"errors {self.errors}")


def verify_request(host: str, port: int, root_key: str, body: bytes) -> bytes:
    return (f"POST /v2/keys.verifyKey HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {root_key}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def soak_baseline(args: argparse.Namespace, tmp: Path, root_key: str, body: bytes, rate: float,
                  runner) -> Baseline:  # noqa: ANN001
    """The ceiling started, soaked at `rate` for --baseline-seconds (it ignores what it is sent and answers
    a fixed VALID verification, so keysvc's request serves), and stopped."""
    baseline = Baseline(args.baseline_seconds, args.workers)
    port = bh.free_port()
    server = bh.Server("raw ASGI", bh.ceiling_argv(args.workers, port), port, tmp / "raw.log", "/")
    server.start()
    try:
        runner(baseline.run(bh.HOST, port, verify_request(bh.HOST, port, root_key, body), rate, args.connections,
                            args.interval))
    finally:
        server.stop()
    return baseline


async def soak(args: argparse.Namespace, host: str, port: int, request: bytes, rate: float,
               procs: Processes, app: AppLatency | None) -> tuple[Generator, list[dict], list[tuple[float, dict]]]:
    try:
        import uvloop

        loop_name = f"uvloop {uvloop.__version__}"
    except ImportError:  # pragma: no cover - granian[uvloop] installs it
        loop_name = "asyncio"
    gen = Generator(host, port, request, rate, args.connections)
    await gen.connect()
    rows: list[dict] = []
    samples: list[tuple[float, dict]] = []
    first_sample = procs.sample() if procs.root is not None else {}
    labels = list(first_sample)
    head = ["t (s)", "answered", "req/s", "p50 ms", "p99 ms", "max ms", "app p99 ms", "errors", "backlog",
            "gen lag ms", "gen CPU", "idle", "load", "workers CPU", "flusher CPU",
            *[f"{label} MiB" for label in labels]]
    # every process's RSS and, after the slash, its anonymous part
    print(f"open loop on {loop_name}: {rate:,.0f} req/s over {args.connections} connections, "
          f"{args.duration:g} s, a row every {args.interval:g} s; latency: ms from the request's sending (from "
          f"when it was due if it had to wait for a free connection); backlog: due requests waiting for a "
          f"connection at the end of the row; app p99: at most this long inside the app, from the workers' "
          f"histogram (its bucket bounds: 1, 2.5, 5, 10, 25, 50, 100, 250 ms ...); gen lag: how late the "
          f"generator sent a request at worst (its tick is 1 ms); idle: the machine's idle CPU (/proc/stat), 0% "
          f"when every core was busy; workers CPU, flusher CPU: their CPU time in the row, 100% = one core; "
          f"per process: RSS/anonymous RSS in MiB (VmRSS/RssAnon)")
    print()
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---:" for _ in head) + " |")
    state = {"next": args.interval, "cpu": resource.getrusage(resource.RUSAGE_SELF), "t": 0.0, "sample": first_sample}
    idle = IdleCpu()

    def row(elapsed: float) -> None:
        done = gen.take_interval()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (usage.ru_utime + usage.ru_stime - state["cpu"].ru_utime - state["cpu"].ru_stime)
        span = max(elapsed - state["t"], 1e-9)
        state["cpu"], state["t"] = usage, elapsed
        sample = procs.sample() if procs.root is not None else {}
        cpu_of = {label: cpu_share(sample, state["sample"], label, span) for label in sample}
        state["sample"] = sample
        samples.append((elapsed, sample))
        lat = done.latencies
        record = {"t": elapsed, "answered": len(lat), "rate": len(lat) / span, "p50": lat.percentile(0.5),
                  "p99": lat.percentile(0.99), "max": lat.max, "errors": done.errors,
                  "kinds": dict(done.error_kinds), "backlog": len(gen.backlog), "cpu": cpu / span,
                  "load": os.getloadavg()[0], "idle": idle.fraction(), "rss": sample,
                  "app_p99": app.p99_ms() if app is not None else float("nan")}
        rows.append(record)
        for label in sample:
            if label not in labels:
                labels.append(label)
        cells = [f"{elapsed:.0f}", f"{len(lat):,}", f"{record['rate']:,.0f}", fmt_ms(record["p50"]),
                 fmt_ms(record["p99"]), fmt_ms(record["max"]), app_p99_cell(record["app_p99"]),
                 str(done.errors), str(record["backlog"]),
                 fmt_ms(done.lag * 1000), f"{record['cpu']:.0%}", f"{record['idle']:.0%}", f"{record['load']:.2f}",
                 percent(sum(v for k, v in cpu_of.items() if k.startswith("worker"))), percent(cpu_of.get("flusher")),
                 *[mib(record["rss"].get(label)) for label in labels]]
        print("| " + " | ".join(cells) + " |", flush=True)
        for kind, count in done.error_kinds.items():
            print(f"|   error x{count}: {kind} |", flush=True)
        for event in procs.events:
            print(f"|   {event} |", flush=True)
        procs.events.clear()

    def on_tick(elapsed: float, final: bool = False) -> None:
        if final:
            if gen.current.latencies or gen.current.errors:
                row(elapsed)
            return
        if elapsed >= state["next"]:
            row(elapsed)
            state["next"] += args.interval

    try:
        await gen.run(args.duration, on_tick)
    finally:
        gen.close()
    return gen, rows, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running keysvc (default: start `keysvc serve` on a fresh data dir)")
    parser.add_argument("--root-key", help="with --url: a root key that may create APIs and keys and verify")
    parser.add_argument("--pid", type=int, help="with --url: the pid of its `keysvc serve`, to sample RSS")
    parser.add_argument("--workers", type=int, default=2, help="workers of the server it starts (default 2)")
    parser.add_argument("--config", help="a YAML config for the server it starts (default: none, the defaults)")
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--interval", type=float, default=10, help="seconds per row (default 10)")
    parser.add_argument("--warmup", type=float, default=60,
                        help="seconds of load before the verdict's first RSS sample and p99s (default 60)")
    parser.add_argument("--fraction", type=float, default=0.5, help="of the measured capacity (default 0.5)")
    parser.add_argument("--capacity", type=float, help="req/s: skip measuring it")
    parser.add_argument("--capacity-seconds", type=int, default=10, help="the wrk run measuring capacity (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="open-loop connections (default 64)")
    parser.add_argument("--baseline-seconds", type=float, default=120,
                        help="seconds of the same-rate soak of the raw ASGI ceiling before keysvc's (default 120; "
                             "0: none)")
    parser.add_argument("--strict", action="store_true", help="exit 1 also when the RSS or p99 verdict fails")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data dir, server log)")
    args = parser.parse_args()
    if args.url and not args.root_key:
        parser.error("--url needs --root-key")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="keysvc-soak-"))
    server = None
    print("# keysvc soak: keys.verifyKey at a fixed fraction of the measured capacity")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
          f"load average {os.getloadavg()[0]:.2f} (the generator, the server and anything else share the cores)")
    print(f"python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    wrk_label = bh.wrk_version() if shutil.which("wrk") else "wrk: not installed"
    print(f"granian {version('granian')}, uvloop {version('uvloop')}, msgspec {version('msgspec')}, "
          f"lmdb {version('lmdb')}, chdb {version('chdb')}, {wrk_label}")
    print(f"keysvc {version('keysvc')} at {keysvc_revision()}, core: {bh.compiled_core()}")
    print(f"run: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print()
    try:
        if args.url:
            split = urlsplit(args.url)
            host, port = split.hostname or "127.0.0.1", split.port or 80
            root_key = args.root_key
            procs = Processes(args.pid)
            print(f"server: {args.url}" + ("" if args.pid else " (no --pid: RSS not sampled)"))
        else:
            host, port = bh.HOST, bh.free_port()
            data_dir = tmp / "data"
            root_key = bh.create_root_key(data_dir)
            argv = [bh.PYTHON, "-m", "keysvc", "serve", "--workers", str(args.workers), "--host", host,
                    "--port", str(port), "--data-dir", str(data_dir)]
            if args.config:
                argv += ["--config", str(Path(args.config).resolve())]
            server = bh.Server("keysvc serve", argv, port, tmp / "serve.log", "/v2/liveness")
            server.start()
            procs = Processes(server.process.pid)  # type: ignore[union-attr]
            config = f"config {args.config}: {Path(args.config).read_text().strip()!r}" if args.config else \
                "default config: analytics on, embedded chDB"
            print(f"server: {shlex.join(argv)}   ({config})")
            time.sleep(1.0)  # the flusher's start-up, so that the first sample sees every process
            procs.refresh()
        print("processes: " + ", ".join(f"{label} (pid {pid})" for pid, label in procs.labels.items()))
        key_id, key = bh.create_bench_key(port, root_key)
        body = bh.verify_body(key)
        credits_before = bh.check_verify(port, root_key, body)["data"]["credits"]
        print(f"bench key {key_id}: 1 auto-applied ratelimit ({bh.HUGE_LIMIT} per {bh.DURATION_MS} ms), "
              f"credits {bh.HUGE_CREDITS}; POST /v2/keys.verifyKey, body {len(body)} bytes")

        wrk_counted = 0
        if args.capacity:
            capacity = args.capacity
            print(f"capacity: {capacity:,.0f} req/s (given)")
        else:
            if shutil.which("wrk") is None:
                raise BenchError("wrk is not on PATH: give --capacity")
            script = tmp / "verify.lua"
            bh.lua_script(script, body, root_key)
            wrk = argparse.Namespace(threads=1, connections=32)
            warm = bh.run_wrk(bh.wrk_argv(wrk, script, port, 2), 2)
            measured = bh.run_wrk(bh.wrk_argv(wrk, script, port, args.capacity_seconds), args.capacity_seconds)
            wrk_counted = warm["requests"] + measured["requests"]
            if measured["non2xx"] or measured["socket_errors"] or warm["non2xx"]:
                raise BenchError(f"wrk saw errors while measuring capacity:\n{measured['raw']}")
            capacity = measured["rps"]
            print(f"capacity: {capacity:,.0f} req/s, closed loop: `wrk -t1 -c32 -d{args.capacity_seconds}s` "
                  f"(after 2 s of warm-up), p50 {fmt_ms(measured['p50'])} ms, p99 {fmt_ms(measured['p99'])} ms")
        rate = capacity * args.fraction
        print(f"soak rate: {args.fraction:g} x capacity = {rate:,.0f} req/s")
        print()

        request = verify_request(host, port, root_key, body)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        baseline = None
        if args.baseline_seconds > 0:
            baseline = soak_baseline(args, tmp, root_key, body, rate, runner)
            print(baseline.line(rate, args.connections))
            print()
        app = AppLatency(data_dir) if server is not None else None
        gen, rows, samples = runner(soak(args, host, port, request, rate, procs, app))
        if server is not None and (server.process is None or server.process.poll() is not None):
            raise BenchError(f"keysvc serve died during the soak:\n{server.log()}")

        # Every VALID answer charged one credit: the server really verified what it answered.
        credits_after = bh.check_verify(port, root_key, body)["data"]["credits"]
        spent = credits_before - credits_after - 1  # the check itself costs 1
        expected = gen.valid + wrk_counted
        slack = 32 * 2 if wrk_counted else 0  # wrk's requests in flight when it stopped
        credits_ok = expected <= spent <= expected + slack + gen.errors_total

        after = [r for r in rows if r["t"] >= min(args.warmup, args.duration)] or rows
        p99s = [r["p99"] for r in after if r["p99"] == r["p99"]]
        median_p99 = statistics.median(p99s) if p99s else float("nan")
        p99_ratio = max(p99s) / median_p99 if p99s else float("nan")
        first_p99, last_p99 = p99_thirds(p99s)
        p99_drift = last_p99 / first_p99 if first_p99 > 0 else float("nan")
        p99_ok = p99_drift <= P99_DRIFT
        all_lat_p50 = statistics.median([r["p50"] for r in after if r["p50"] == r["p50"]] or [float("nan")])
        answered = sum(r["answered"] for r in rows)
        elapsed = rows[-1]["t"] if rows else args.duration
        print()
        print(f"sent {gen.sent:,}, answered VALID {gen.valid:,}, errors {gen.errors_total}; achieved "
              f"{answered / max(elapsed, 1e-9):,.0f} req/s of {rate:,.0f} wanted; credits spent {spent:,} for "
              f"{gen.valid:,} VALID answers + {wrk_counted:,} wrk requests"
              + (f" (+ up to {slack} in flight)" if slack else "") + f": {'ok' if credits_ok else 'MISMATCH'}")
        print()
        print(f"## verdict (after the first {min(args.warmup, args.duration):g} s of load)")
        print()
        rss_ok = True
        if samples and procs.root is not None:
            lines, rss_ok = rss_verdict(samples, args.warmup)
            print("| process | RSS (VmRSS) first -> last after warm-up | anonymous RSS (RssAnon) first -> last | "
                  f"anonymous floor of each {WINDOWS}th of the run, MiB | floor growth | over the last half | verdict |")
            print("| --- | --- | --- | --- | ---: | ---: | --- |")
            for line in lines:
                print(line)
            print()
        print("| check | measured | target | result |")
        print("| --- | --- | --- | --- |")
        if procs.root is not None:
            print(f"| anonymous RSS flat, every process | see above | floor growth <= {RSS_GROWTH_MIB:g} MiB or "
                  f"{RSS_GROWTH_PCT:g}%, <= {RSS_LATE_GROWTH_MIB:g} MiB over the last half | "
                  f"{'PASS' if rss_ok else 'FAIL'} |")
        print(f"| p99 stable: median interval p99, last third / first third | {last_p99:.2f} / {first_p99:.2f} ms "
              f"= {p99_drift:.2f} | <= {P99_DRIFT:g} | {'PASS' if p99_ok else 'FAIL'} |")
        print(f"| p99 spikes: max interval p99 / median interval p99 | {max(p99s) if p99s else float('nan'):.2f} / "
              f"{median_p99:.2f} ms = {p99_ratio:.2f} | (shown, not judged) | |")
        if baseline is not None:
            ceiling_p99 = baseline.median_p99()
            print(f"| p99 against the same-rate ceiling: median interval p99, keysvc / ceiling | "
                  f"{median_p99:.2f} / {ceiling_p99:.2f} ms = "
                  f"{median_p99 / ceiling_p99 if ceiling_p99 > 0 else float('nan'):.2f} | "
                  f"(shown, not judged) | |")
        print(f"| errors (non-200, not VALID, dropped, unanswered) | {gen.errors_total} | 0 | "
              f"{'PASS' if gen.errors_total == 0 else 'FAIL'} |")
        print(f"| credits spent = VALID answers | {spent:,} / {expected:,} | equal | "
              f"{'PASS' if credits_ok else 'FAIL'} |")
        print()
        print(f"median interval p50 {fmt_ms(all_lat_p50)} ms; finished in {time.monotonic() - started:.0f} s, "
              f"load average now {os.getloadavg()[0]:.2f}")
        failed = gen.errors_total > 0 or not credits_ok
        if args.strict:
            failed = failed or not (rss_ok and p99_ok)
        return 1 if failed else 0
    finally:
        if server is not None:
            server.stop()
        remove_unless_kept(tmp, args.keep)


if __name__ == "__main__":
    run_script(main, (BenchError, bh.BenchError))
