"""What does analytics cost? The flusher's drain rate into chDB, and verifyKey with analytics on against off.

    .venv/bin/python bench/analytics.py [--events 500000] [--duration 10] [--rounds 2] [--profile] [--pause-flusher]

Two questions in one run:

1. Drain: how many events per second go from the spool through the flusher into ClickHouse (the
   embedded chDB)? Each round takes a fresh data dir, fills its spool with N realistic
   VerificationEvents (keysvc.analytics.events.encode, Spool.append in chunks of 1,000, as workers
   do), then starts the flusher as `keysvc serve` does (`python -m keysvc.analytics` with
   KEYSVC_CONFIG_JSON, default analytics settings) and watches the spool's depth. The rate counts
   from the first landed batch (the flusher's interpreter start, chDB's start and the schema
   creation excluded) to the spool being empty and the rollups, which the flusher builds once it is
   (keysvc.analytics.rollups), holding every event; then ClickHouse must hold exactly N rows in
   key_verifications_v1 (asked through keysvc.analytics.client.run_query) and N in the per-minute
   rollup. For context, each round also times a flusher's start-up on an empty spool (until it
   answers queries) and gives the wall-clock rate from the flusher's start. Target: >= 50,000 events/s.

2. Overhead: `keysvc serve --workers 2` with analytics enabled (default batch settings) and with
   analytics disabled, each with its own data dir, root key and a key like bench/http.py's (one
   auto-applied ratelimit that never denies, credits that never run out), loaded with wrk in turn,
   A B A B ..., exactly as bench/http.py does. After every "on" run the bench waits for its spool to
   drain before the next run, so that the flusher's leftover work does not land on the "off" run; the
   backlog it left and how long the drain took are printed. Afterwards the verification rows that
   reached ClickHouse must match the verifications wrk counted (plus the bench's own 2 checks, plus
   up to one request per connection per run in flight when wrk stopped). Target: on >= 0.9 x off req/s.

Diagnostics, off by default: --profile adds one more drain round under py-spy (where the flusher's
main thread spends the drain, not counted in the medians); --pause-flusher adds a third verifyKey
variant, analytics on with the flusher stopped (SIGSTOP) during the run, which splits the overhead
into the workers' spooling and the flusher's share of the CPU.

Prints the machine, the exact commands, every round and one table of medians per question with the
targets. Exits 0 whatever the results (non-zero only if the bench itself breaks). All processes it
starts are stopped on exit.
"""
# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# Run as `python bench/analytics.py`, this file's folder comes first on sys.path and bench/http.py
# would shadow the standard library's `http` package: move that folder last before anything imports it.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))  # last: the standard library first, bench/machine.py still found
sys.dont_write_bytecode = True  # no __pycache__ in bench/ for importing the sibling script

import argparse
import asyncio
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from machine import bench_http, remove_unless_kept, run_script

bh = bench_http()  # bench/http.py's helpers

from keysvc.analytics import events
from keysvc.analytics.client import AnalyticsUnavailable, run_query
from keysvc.analytics.spool import Spool
from keysvc.config import AnalyticsConfig, Config, StorageConfig, to_json

BenchError = bh.BenchError
PYTHON, REPO, HOST = bh.PYTHON, bh.REPO, bh.HOST
CONFIG_ENV = "KEYSVC_CONFIG_JSON"
DRAIN_TARGET = 50_000  # events/s through spool and flusher into chDB
RATIO_TARGET = 0.9  # verifyKey req/s with analytics on >= 0.9 x off
CHUNK = 1_000  # events per Spool.append while filling
POLL = 0.005  # seconds between two looks at the spool's depth
ROLLUP_POLL = 0.02  # seconds between two queries of the rollups, once the spool is empty
DEFAULTS = AnalyticsConfig()


# -- helpers ----------------------------------------------------------------------------------------


def query(data_dir: Path, sql: str, timeout: float = 60.0) -> list[dict]:
    return asyncio.run(run_query(str(data_dir), sql, timeout))


def count_rows(data_dir: Path, table: str = "key_verifications_v1", column: str = "count()") -> int:
    rows = query(data_dir, f"SELECT toInt64({column}) AS n FROM {table}")
    return int(rows[0]["n"])


def wait_queries(data_dir: Path, timeout: float, alive=lambda: True) -> float:
    """Seconds until the flusher at data_dir answers a query (its schema is ready)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not alive():
            raise BenchError(f"the flusher of {data_dir} exited while starting")
        try:
            query(data_dir, "SELECT 1 AS one", 5.0)
            return time.monotonic() - start
        except AnalyticsUnavailable:
            time.sleep(0.02)
    raise BenchError(f"the flusher of {data_dir} did not answer queries within {timeout:.0f} s")


def alive_cmdline(pid: int, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (chDB's included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PY_SPY = str(Path(PYTHON).parent / "py-spy")
# Where the flusher's main thread is, by the innermost frame that matches (py-spy's raw stacks).
PROFILE_BUCKETS = (
    ("Connection.query (chdb/", "chDB executing the INSERT (the engine: raw table, 4 materialized views, parts)"),
    ("clickhouse_connect/", "clickhouse-connect building the insert (rows to columns, Native format)"),
    ("decode_rows (", "decode_rows (msgpack to row tuples)"),
    ("keysvc/analytics/spool.py", "Spool: read, begin_flight, land, depth (LMDB)"),
    ("Flusher.sleep (", "waiting (Flusher.sleep)"),
)


def profile_summary(raw: Path) -> list[tuple[str, float]]:
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if "Flusher.run (" not in stack:  # the main thread only (not the query server's)
            continue
        frames = stack.split(";")
        label = "other Python"
        for frame in reversed(frames):
            match = next((name for needle, name in PROFILE_BUCKETS if needle in frame), None)
            if match:
                label = match
                break
        counts[label] = counts.get(label, 0) + int(n)
        total += int(n)
    return [(label, n / total) for label, n in sorted(counts.items(), key=lambda kv: -kv[1])] if total else []


class FlusherProcess:
    """`python -m keysvc.analytics` as keysvc serve's Supervisor starts it (config in KEYSVC_CONFIG_JSON,
    a session of its own), stopped with SIGTERM (a drain) and, if need be, SIGKILL."""

    def __init__(self, config: Config, log_path: Path) -> None:
        self.argv = [PYTHON, "-m", "keysvc.analytics"]
        self.env = {**os.environ, CONFIG_ENV: to_json(config).decode()}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            self.process = None


# -- question 1: the drain ------------------------------------------------------------------------------

_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def realistic_events(n: int, seed: int) -> list[bytes]:
    """N encoded VerificationEvents like a busy node's: one API's key space, 2,000 keys (a few hot), a
    quarter of them with an identity, outcomes mostly VALID, a third with tags, 20,000 events/s."""
    rnd = random.Random(seed)

    def rid(prefix: str, length: int) -> str:
        return prefix + "".join(rnd.choices(_ALNUM, k=length))

    keyspace = rid("ks_", 16)
    identities = [(rid("id_", 16), f"user_{i}") for i in range(500)]
    keys = [(rid("key_", 16), identities[i % 500] if i % 4 == 0 else ("", "")) for i in range(2_000)]
    weights = [1.0 / (i + 1) for i in range(len(keys))]  # a few hot keys, a long tail
    tag_sets = [[], [], ["path=/v1/chat"], ["path=/v1/embed", "plan=pro"], ["region=eu-west-1", "env=prod"]]
    outcomes = (["VALID"] * 90 + ["RATE_LIMITED"] * 5 + ["USAGE_EXCEEDED"] * 2
                + ["DISABLED", "EXPIRED", "NOT_FOUND"])  # per 100
    chosen = rnd.choices(range(len(keys)), weights=weights, k=n)
    start = int(time.time() * 1000) - n // 20  # 20 events per ms, ending about now
    encode, event = events.encode, events.VerificationEvent
    out = []
    for i in range(n):
        outcome = outcomes[rnd.randrange(100)]
        if outcome == "NOT_FOUND":
            out.append(encode(event(rid("req_", 9), start + i // 20, "", "", "", "", outcome, [], 0,
                                    round(rnd.uniform(0.03, 0.4), 3))))
            continue
        key_id, (identity_id, external_id) = keys[chosen[i]]
        out.append(encode(event(rid("req_", 9), start + i // 20, keyspace, identity_id, external_id, key_id, outcome,
                                list(tag_sets[rnd.randrange(len(tag_sets))]), 1 if outcome == "VALID" else 0,
                                round(rnd.uniform(0.05, 2.5), 3))))
    return out


def fill_spool(data_dir: Path, encoded: list[bytes]) -> float:
    spool = Spool(str(data_dir), DEFAULTS.spool_map_size)
    try:
        start = time.perf_counter()
        for i in range(0, len(encoded), CHUNK):
            if not spool.append(encoded[i:i + CHUNK]):
                raise BenchError("Spool.append refused events while filling")
        elapsed = time.perf_counter() - start
        if spool.depth() != len(encoded):
            raise BenchError(f"the spool holds {spool.depth()} events, not {len(encoded)}")
        return elapsed
    finally:
        spool.close()


def drain_config(data_dir: Path) -> Config:
    return Config(storage=StorageConfig(data_dir=str(data_dir)), analytics=AnalyticsConfig())


def drain_round(tmp: Path, rnd: int, encoded: list[bytes], timeout: float, profile: Path | None = None) -> dict:
    n = len(encoded)
    # The flusher's start-up alone, on an empty spool: until it answers queries (schema created).
    empty_dir = tmp / f"drain{rnd}-empty"
    flusher = FlusherProcess(drain_config(empty_dir), tmp / f"drain{rnd}-empty.log")
    try:
        flusher.start()
        startup_empty = wait_queries(empty_dir, 120, flusher.alive)
    finally:
        flusher.stop()
    shutil.rmtree(empty_dir, ignore_errors=True)

    data_dir = tmp / f"drain{rnd}"
    fill = fill_spool(data_dir, encoded)
    log_path = tmp / f"drain{rnd}.log"
    flusher = FlusherProcess(drain_config(data_dir), log_path)
    watch = Spool(str(data_dir), DEFAULTS.spool_map_size)
    spy = None
    try:
        flusher.start()
        t_start = time.perf_counter()
        landed: list[tuple[float, int]] = []  # (time, depth) at every change of depth
        cpu: list[float] = []  # the flusher's CPU seconds at the first landed batch and at the end
        depth = n
        while depth:
            time.sleep(POLL)
            now = time.perf_counter()
            new = watch.depth()
            if new != depth:
                if not landed:
                    cpu.append(cpu_seconds(flusher.process.pid))
                    if profile is not None:
                        spy = subprocess.Popen([PY_SPY, "record", "--pid", str(flusher.process.pid), "--rate", "200",
                                                "--format", "raw", "--idle", "--nonblocking", "--output", str(profile)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                landed.append((now, new))
                depth = new
            if not flusher.alive():
                raise BenchError(f"the flusher exited with {flusher.process.returncode}:\n{log_tail(log_path)}")
            if now - t_start > timeout:
                raise BenchError(f"the spool still holds {depth} of {n} events after {timeout:.0f} s:\n"
                                 f"{log_tail(log_path)}")
        # The flusher rolls up once the spool is empty (keysvc.analytics.rollups): the drain lasts until
        # the rollups hold every event too, as when a materialized view built them inside each insert.
        while (rolled := count_rows(data_dir, "key_verifications_per_minute_v1", "sum(count)")) != n:
            if time.perf_counter() - t_start > timeout:
                raise BenchError(f"the rollups hold {rolled} of {n} events after {timeout:.0f} s:\n"
                                 f"{log_tail(log_path)}")
            time.sleep(ROLLUP_POLL)
        t_done = time.perf_counter()  # spool empty, every event rolled up
        cpu.append(cpu_seconds(flusher.process.pid))
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            spy.wait(30)
        t_first, d0 = landed[0]
        rows = count_rows(data_dir)
        dropped = watch.dropped()
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        watch.close()
        flusher.stop()
    shutil.rmtree(data_dir, ignore_errors=True)
    gaps = [b[0] - a[0] for a, b in zip(landed, landed[1:])]
    per_batch = [(a[1] - b[1]) for a, b in zip(landed, landed[1:])]
    drain = t_done - t_first
    wall = t_done - t_start
    return {
        "fill": fill, "startup_empty": startup_empty, "first": t_first - t_start, "drain": drain,
        "drained": d0, "rate": d0 / drain if drain > 0 else float("inf"), "wall": wall, "wall_rate": n / wall,
        "minus_startup_rate": n / (wall - startup_empty) if wall > startup_empty else float("nan"),
        "batch_ms": statistics.median(gaps) * 1000 if gaps else float("nan"),
        "batch_events": statistics.median(per_batch) if per_batch else d0,
        "rows": rows, "rolled": rolled, "dropped": dropped, "changes": len(landed),
        "cpu": (cpu[1] - cpu[0]) / drain if drain > 0 else float("nan"),
    }


def question_drain(args: argparse.Namespace, tmp: Path) -> tuple[bool, list[str]]:
    n = args.events
    print(f"## 1. drain: {n:,} spooled VerificationEvents through the flusher into chDB")
    print()
    flusher_cmd = (f"{CONFIG_ENV}='<config JSON: data_dir, analytics defaults>' "
                   f"{shlex.join([PYTHON, '-m', 'keysvc.analytics'])}")
    print(f"- flusher: `{flusher_cmd}` (as `keysvc serve` starts it), batch_size {DEFAULTS.batch_size:,}, "
          f"flush_interval {DEFAULTS.flush_interval} s, chDB under <data_dir>/chdb")
    print(f"- events: {n:,} encoded with keysvc.analytics.events.encode, appended with Spool.append in chunks of "
          f"{CHUNK:,} before the flusher starts; the spool's depth polled every {POLL * 1000:.0f} ms")
    print("- drain events/s = events left at the first landed batch / (spool empty and every event in the "
          "per-minute rollup - first landed batch): the "
          "flusher's start-up and its first batch are excluded. `wall` counts from the flusher's start; "
          "`- start-up` is N / (wall - start-up on an empty spool, measured in the same round)")
    if n % DEFAULTS.batch_size:
        print(f"- note: {n:,} is not a multiple of batch_size: the last, partial batch waits for flush_interval "
              f"({DEFAULTS.flush_interval} s), which the drain time includes")
    print()
    t0 = time.perf_counter()
    encoded = realistic_events(n, seed=1)
    sizes = sorted(len(e) for e in encoded)
    print(f"generated and encoded in {time.perf_counter() - t0:.1f} s; encoded size median {sizes[len(sizes) // 2]} "
          f"bytes (min {sizes[0]}, max {sizes[-1]})")
    print()
    print("| round | fill (Spool.append) | start-up, empty spool | first batch landed | drain | drain events/s | "
          "median batch | flusher CPU / drain s | wall from start | wall events/s | - start-up events/s | "
          "rows / rollup | dropped |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    results, failures = [], []
    for rnd in range(1, args.rounds + 1):
        res = drain_round(tmp, rnd, encoded, args.drain_timeout)
        results.append(res)
        ok = res["rows"] == n and res["rolled"] == n and res["dropped"] == 0
        if not ok:
            failures.append(f"round {rnd}: {res['rows']:,} rows, {res['rolled']:,} in the rollup, "
                            f"{res['dropped']} dropped (expected {n:,}, {n:,}, 0)")
        print(f"| {rnd} | {res['fill']:.2f} s ({n / res['fill']:,.0f}/s) | {res['startup_empty']:.2f} s | "
              f"{res['first']:.2f} s | {res['drain']:.2f} s ({res['drained']:,} events) | {res['rate']:,.0f} | "
              f"{res['batch_ms']:.0f} ms / {res['batch_events']:,.0f} | {res['cpu']:.2f} | {res['wall']:.2f} s | "
              f"{res['wall_rate']:,.0f} | "
              f"{res['minus_startup_rate']:,.0f} | {res['rows']:,} / {res['rolled']:,}{'' if ok else ' MISMATCH'} | "
              f"{res['dropped']} |", flush=True)
    med = {k: statistics.median(r[k] for r in results) for k in ("rate", "wall_rate", "minus_startup_rate",
                                                                 "batch_ms", "startup_empty", "first", "cpu")}
    passed = med["rate"] >= DRAIN_TARGET
    print()
    print(f"### 1. medians over {args.rounds} round(s)")
    print()
    print("| measure | median | target | result |")
    print("| --- | ---: | --- | --- |")
    print(f"| drain events/s, from the first landed batch | {med['rate']:,.0f} | >= {DRAIN_TARGET:,} | "
          f"{'PASS' if passed else 'FAIL'} |")
    print(f"| events/s, N / (wall - start-up on an empty spool) | {med['minus_startup_rate']:,.0f} | — | |")
    print(f"| events/s, wall clock from the flusher's start | {med['wall_rate']:,.0f} | — | |")
    print(f"| one batch of {DEFAULTS.batch_size:,} (read, decode, insert, land) | {med['batch_ms']:.0f} ms | — | |")
    print(f"| the flusher's CPU seconds (all threads) per second of drain | {med['cpu']:.2f} | — | |")
    print(f"| flusher start-up: empty spool / until the first batch landed | {med['startup_empty']:.2f} s / "
          f"{med['first']:.2f} s | — | |")
    print(f"| ClickHouse holds N rows (raw and per-minute rollup), none dropped | "
          f"{'; '.join(failures) or 'every round'} | all rounds | {'FAIL' if failures else 'PASS'} |")
    print()
    if args.profile:
        raw = tmp / "drain-profile.raw"
        res = drain_round(tmp, args.rounds + 1, encoded, args.drain_timeout, profile=raw)
        print("### 1. where the flusher's main thread spends the drain (py-spy, one more round, not counted above)")
        print()
        print(f"`{PY_SPY} record --pid <flusher> --rate 200 --format raw --idle --nonblocking` from the first landed "
              f"batch to the rolled-up, empty spool; that round drained at {res['rate']:,.0f} events/s, flusher CPU "
              f"{res['cpu']:.2f} s per second")
        print()
        print("| share of samples | where |")
        print("| ---: | --- |")
        for label, share in (profile_summary(raw) if raw.exists() else []):
            print(f"| {share * 100:.0f}% | {label} |")
        print()
    return passed, failures


# -- question 2: verifyKey with analytics on against off -------------------------------------------------


def find_flusher(server) -> int | None:
    for pid in server.worker_pids():
        if alive_cmdline(pid, "keysvc.analytics"):
            return pid
    return None


def wait_drained(spool: Spool, timeout: float) -> float:
    start = time.monotonic()
    while spool.depth():
        if time.monotonic() - start > timeout:
            raise BenchError(f"the spool still holds {spool.depth()} events after {timeout:.0f} s")
        time.sleep(0.01)
    return time.monotonic() - start


def question_overhead(args: argparse.Namespace, tmp: Path, flusher_pids: set[int],
                      servers: dict) -> tuple[bool, list[str]]:
    names = ("on", "off")
    dirs = {name: tmp / f"serve-{name}" for name in names}
    ports = {name: bh.free_port() for name in names}
    argvs = {}
    for name in names:
        cfg = tmp / f"analytics-{name}.yaml"
        cfg.write_text(f"analytics:\n  enabled: {'true' if name == 'on' else 'false'}\n")
        argvs[name] = [PYTHON, "-m", "keysvc", "serve", "--workers", str(args.workers), "--host", HOST, "--port",
                       str(ports[name]), "--data-dir", str(dirs[name]), "--config", str(cfg)]
        servers[name] = bh.Server(f"keysvc serve (analytics {name})", argvs[name], ports[name],
                                  tmp / f"serve-{name}.log", "/v2/liveness")
    scripts = {name: tmp / f"verify-{name}.lua" for name in names}
    roots, bodies, keys, credits_before = {}, {}, {}, {}
    for name in names:
        roots[name] = bh.create_root_key(dirs[name])
        servers[name].start()
        key_id, key = bh.create_bench_key(ports[name], roots[name])
        keys[name] = key_id
        bodies[name] = bh.verify_body(key)
        bh.lua_script(scripts[name], bodies[name], roots[name])
        credits_before[name] = bh.check_verify(ports[name], roots[name], bodies[name])["data"]["credits"]
    pid = find_flusher(servers["on"])
    if pid is None:
        raise BenchError(f"no analytics flusher under keysvc serve (analytics on):\n{servers['on'].log()}")
    flusher_pids.add(pid)
    if find_flusher(servers["off"]) is not None:
        raise BenchError("keysvc serve with analytics disabled runs a flusher")
    wait_queries(dirs["on"], 120)
    spool = Spool(str(dirs["on"]), DEFAULTS.spool_map_size)
    drain_wait = DEFAULTS.flush_interval + 60

    print(f"## 2. keys.verifyKey with analytics on against off, {args.workers} workers each")
    print()
    print("commands:")
    for name in names:
        print(f"  {name}:  {shlex.join(argvs[name])}   (analytics-{name}.yaml: `analytics: {{enabled: "
              f"{'true' if name == 'on' else 'false'}}}`, other settings default)")
    wrk_cmd = shlex.join(bh.wrk_argv(args, scripts["on"], 0, args.duration)).replace(":0/", ":<port>/")
    print(f"  load: {wrk_cmd.replace('verify-on.lua', 'verify-<on|off>.lua')}")
    print(f"  verify-<on|off>.lua: POST /v2/keys.verifyKey, body {len(bodies['on'])} bytes {{\"key\": <that server's "
          f"bench key>}}, Content-Type application/json, Authorization: Bearer <that server's root key>")
    print(f"  bench keys {keys['on']} (on), {keys['off']} (off): 1 auto-applied ratelimit ({bh.HUGE_LIMIT} per "
          f"{bh.DURATION_MS} ms), credits {bh.HUGE_CREDITS}")
    print(f"  analytics on: batch_size {DEFAULTS.batch_size:,}, flush_interval {DEFAULTS.flush_interval} s; after "
          f"every 'on' run the bench waits for the spool to drain before the next run")
    print()

    # The variants loaded in turn: (label, server); "paused" is the diagnostic third one (--pause-flusher):
    # analytics on with the flusher stopped (SIGSTOP) for the run, so that only the workers' spooling costs.
    variants = [("on", "on"), ("off", "off")] + ([("on, flusher paused", "on")] if args.pause_flusher else [])
    warmup = {}
    for name in names:
        warmup[name] = bh.run_wrk(bh.wrk_argv(args, scripts[name], ports[name], bh.WARMUP_SECONDS), bh.WARMUP_SECONDS)
        if name == "on":
            wait_drained(spool, drain_wait)
    failures = [f"warm-up {name}: {res['non2xx']} non-2xx/3xx answers" for name, res in warmup.items() if res["non2xx"]]
    results: dict[str, list[dict]] = {label: [] for label, _ in variants}
    print("| round | analytics | req/s | p50 | p75 | p90 | p99 | requests | non-2xx | socket errors | flusher CPU "
          "during the run | spool left at the end / drained in |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for rnd in range(1, args.rounds + 1):
        for label, name in variants:
            paused = label.endswith("paused")
            cpu_before = cpu_seconds(pid) if name == "on" else 0.0
            if paused:
                os.kill(pid, signal.SIGSTOP)
            try:
                res = bh.run_wrk(bh.wrk_argv(args, scripts[name], ports[name], args.duration), args.duration)
            finally:
                if paused:
                    os.kill(pid, signal.SIGCONT)
            results[label].append(res)
            backlog = flusher_cpu = ""
            if name == "on":
                flusher_cpu = f"{(cpu_seconds(pid) - cpu_before) / args.duration:.2f} s/s"
                left = spool.depth()
                backlog = f"{left:,} / {wait_drained(spool, drain_wait):.1f} s"
            print(f"| {rnd} | {label} | {res['rps']:,.0f} | {bh.fmt_ms(res['p50'])} | {bh.fmt_ms(res['p75'])} | "
                  f"{bh.fmt_ms(res['p90'])} | {bh.fmt_ms(res['p99'])} | {res['requests']:,} | {res['non2xx']} | "
                  f"{res['socket_errors']} | {flusher_cpu} | {backlog} |", flush=True)
            if args.wrk_output:
                print(res["raw"])
            if res["non2xx"]:
                failures.append(f"round {rnd} {label}: {res['non2xx']} non-2xx/3xx answers")
            if res["socket_errors"]:
                failures.append(f"round {rnd} {label}: {res['socket_detail']}")
            server = servers[name]
            if server.process is None or server.process.poll() is not None:
                raise BenchError(f"{server.name} died during round {rnd}:\n{server.log()}")
    if find_flusher(servers["on"]) != pid:
        failures.append("the flusher was restarted during the run (see the server's log)")
    print()

    # Credits, as bench/http.py checks them; then the rows that reached ClickHouse.
    runs = {name: [r for label, server in variants if server == name for r in results[label]] for name in names}
    slack = args.connections * (len(runs["on"]) + 1)  # requests in flight when each wrk run stopped
    counted = {name: warmup[name]["requests"] + sum(r["requests"] for r in runs[name]) for name in names}
    for name in names:
        last = bh.check_verify(ports[name], roots[name], bodies[name])
        spent = credits_before[name] - last["data"]["credits"] - 1  # the last check costs 1
        check = "ok" if counted[name] <= spent <= counted[name] + slack else "MISMATCH"
        if check != "ok":
            failures.append(f"{name}: credits spent {spent:,}, wrk counted {counted[name]:,} (+ up to {slack})")
        print(f"analytics {name}: credits spent under load {spent:,}; wrk counted {counted[name]:,} answers "
              f"(warm-up included, + up to {slack} in flight when wrk stopped): {check}")
    wait_drained(spool, drain_wait)
    rows = count_rows(dirs["on"])
    dropped = spool.dropped()
    spool.close()
    expected = counted["on"] + 2  # the bench's first and last check_verify are verifications too
    rows_ok = expected <= rows <= expected + slack and dropped == 0
    if not rows_ok:
        failures.append(f"ClickHouse rows {rows:,}, expected {expected:,} (+ up to {slack}), dropped {dropped}")
    print(f"analytics on: verification rows in ClickHouse (key_verifications_v1) {rows:,}; wrk counted "
          f"{counted['on']:,} + 2 bench checks = {expected:,} (+ up to {slack} in flight); dropped events "
          f"{dropped}: {'ok' if rows_ok else 'MISMATCH'}")

    med = {label: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
           for label, rs in results.items()}
    ratio = med["on"]["rps"] / med["off"]["rps"]
    passed = ratio >= RATIO_TARGET
    print()
    print(f"### 2. medians over {args.rounds} round(s)")
    print()
    print("| keysvc serve, keys.verifyKey | req/s | p50 | p99 |")
    print("| --- | ---: | ---: | ---: |")
    for label, _ in variants:
        m = med[label]
        print(f"| analytics {label} | {m['rps']:,.0f} | {bh.fmt_ms(m['p50'])} | {bh.fmt_ms(m['p99'])} |")
    for label, _ in variants:
        if label != "off":
            m = med[label]
            print(f"| {label} / off | {m['rps'] / med['off']['rps']:.2f} | {m['p50'] / med['off']['p50']:.2f} | "
                  f"{m['p99'] / med['off']['p99']:.2f} |")
    print()
    print("| target | measured | result |")
    print("| --- | --- | --- |")
    print(f"| verifyKey req/s, analytics on >= {RATIO_TARGET} x off | {ratio:.2f} x | {'PASS' if passed else 'FAIL'} |")
    print(f"| no non-2xx, no socket errors, credits match, ClickHouse rows match | {'; '.join(failures) or 'none'} | "
          f"{'FAIL' if failures else 'PASS'} |")
    print()
    return passed, failures


# -- the run ----------------------------------------------------------------------------------------


def stop_all(servers: dict, flusher_pids: set[int]) -> None:
    for pid in flusher_pids:  # one paused by --pause-flusher must take SIGTERM (and drain) again
        if alive_cmdline(pid, "keysvc.analytics"):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    for server in servers.values():
        try:
            server.stop(timeout=DEFAULTS.drain_timeout + 20)
        except Exception as exc:  # noqa: BLE001 - stop the others anyway
            print(f"stopping {server.name} failed: {exc}", file=sys.stderr)
    # The flusher runs in a session of its own: if keysvc serve had to be killed, it drains and exits
    # by itself (it watches its parent); wait for that, then kill what is left.
    deadline = time.monotonic() + DEFAULTS.drain_timeout + 5
    for pid in flusher_pids:
        while alive_cmdline(pid, "keysvc.analytics") and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive_cmdline(pid, "keysvc.analytics"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500_000, help="events spooled per drain round (default 500000)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each question (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="Granian workers per server (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--drain-timeout", type=float, default=600, help="give up a drain round after this (s)")
    parser.add_argument("--only", choices=("drain", "overhead"), help="answer one question only")
    parser.add_argument("--profile", action="store_true",
                        help="after the drain rounds, one more under py-spy: where the flusher's time goes")
    parser.add_argument("--pause-flusher", action="store_true",
                        help="a third verifyKey variant: analytics on, the flusher paused (SIGSTOP) during the run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs, wrk scripts)")
    parser.add_argument("--wrk-output", action="store_true", help="print wrk's full output for every run")
    args = parser.parse_args()
    if args.events < DEFAULTS.batch_size or args.rounds < 1:
        parser.error(f"--events must be at least batch_size ({DEFAULTS.batch_size}) and --rounds at least 1")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if shutil.which("wrk") is None and args.only != "drain":
        raise BenchError("wrk is not on PATH")

    tmp = Path(tempfile.mkdtemp(prefix="keysvc-analytics-bench-"))
    servers: dict = {}
    flusher_pids: set[int] = set()
    started = time.monotonic()
    try:
        print("# keysvc analytics bench: the flusher's drain rate into chDB, and verifyKey with analytics on vs off")
        print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        print(f"cpu: {bh.cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
              f"load average {os.getloadavg()[0]:.2f} (the flusher, wrk and the servers share the cores)")
        print(f"python: {platform.python_implementation()} {platform.python_version()} ({PYTHON})")
        print(f"clickhouse-connect {bh.version('clickhouse-connect')}, chdb {bh.version('chdb')} "
              f"(chdb-core {bh.version('chdb-core')}), lmdb {bh.version('lmdb')}, granian {bh.version('granian')}, "
              f"uvloop {bh.version('uvloop')}, msgspec {bh.version('msgspec')}"
              + ("" if args.only == "drain" else f", {bh.wrk_version()}"))
        print(f"keysvc {bh.version('keysvc')} at {bh.keysvc_revision()}, core: {bh.compiled_core()}")
        print(f"run: {shlex.join([PYTHON, *sys.argv])}   (cwd {os.getcwd()})")
        print(f"{args.rounds} round(s); drain: {args.events:,} events per round; verifyKey: {args.workers} workers, "
              f"wrk {args.threads} thread(s) x {args.connections} connections, {args.duration} s per run, "
              f"{bh.WARMUP_SECONDS} s warm-up per server")
        print()
        outcome = {}
        if args.only != "overhead":
            outcome["drain"] = question_drain(args, tmp)
        if args.only != "drain":
            outcome["overhead"] = question_overhead(args, tmp, flusher_pids, servers)
        print("## summary")
        print()
        print("| question | target | result |")
        print("| --- | --- | --- |")
        if "drain" in outcome:
            passed, failures = outcome["drain"]
            print(f"| 1. drain through spool and flusher into chDB | >= {DRAIN_TARGET:,} events/s, all rows landed | "
                  f"{'PASS' if passed and not failures else 'FAIL'} |")
        if "overhead" in outcome:
            passed, failures = outcome["overhead"]
            print(f"| 2. verifyKey req/s, analytics on / off | >= {RATIO_TARGET} x, answers and rows match | "
                  f"{'PASS' if passed and not failures else 'FAIL'} |")
        print()
        print(f"finished in {time.monotonic() - started:.0f} s, load average now {os.getloadavg()[0]:.2f}")
        return 0
    finally:
        stop_all(servers, flusher_pids)
        remove_unless_kept(tmp, args.keep)


if __name__ == "__main__":
    run_script(main, (BenchError,))
