"""How many key verifications per second does keysvc's hot path do, in one process?

    .venv/bin/python bench/hotpath.py            # full run, a few minutes (builds a 1M-key store)
    .venv/bin/python bench/hotpath.py --quick    # CI smoke run, well under a minute

Every workload runs against a real LmdbStore in a fresh temporary directory, with keys created
through Management, and calls the Verifier directly (no HTTP). Batches are timed with
time.perf_counter, one `now_ms` per batch; the workloads run round-robin (A B C ... A B C ...)
so that the machine's noise spreads over all of them, and each reports the median over its
repeats. Prints the machine, then one markdown table with the targets beside the figures.
"""

import argparse
import gc
import itertools
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import keysvc._fast._core_c as core_c
import keysvc._fast._core_py as core_py
from keysvc.keys import generate_key, key_digest
from keysvc.management import CreditsSpec, KeySpec, Management, RatelimitSpec
from keysvc.store.lmdb import LmdbStore, StoreConfig
from machine import cpu_model, keysvc_revision, version

REDIS_URL = "redis://127.0.0.1:6379"
HUGE_LIMIT = 10**12  # never reached: a 60 s window would need 16 billion verifications a second
HUGE_CREDITS = 10**15
DURATION_MS = 60_000
IMPORT_BATCH = 10_000


@dataclass
class Mode:
    repeats: int
    batch_seconds: float
    small_keys: int
    large_keys: int


FULL = Mode(repeats=15, batch_seconds=0.1, small_keys=10_000, large_keys=1_000_000)
QUICK = Mode(repeats=5, batch_seconds=0.02, small_keys=10_000, large_keys=100_000)


class BenchError(Exception):
    pass


# -- the machine ----------------------------------------------------------------------------------






def redis_server_version():
    try:
        import redis

        return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).info("server")["redis_version"]
    except Exception:
        return None




def stale_extension_warning():
    """The compiled twin is built from _core_py.py: say so if the source changed since the build."""
    source = Path(core_py.__file__)
    built = Path(core_c.__file__)
    if built.suffix != ".py" and source.stat().st_mtime > built.stat().st_mtime:
        return f"WARNING: {source.name} is newer than {built.name}: the compiled twin may be stale (rebuild it)"
    return None


def machine_lines(mode_name, mode):
    import lmdb

    redis_server = redis_server_version()
    lines = [
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"cpu: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"load average {os.getloadavg()[0]:.2f}",
        f"python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        f"packages: blake3 {version('blake3')}, lmdb {version('lmdb')} (LMDB {'.'.join(map(str, lmdb.version()))}), "
        f"limits {version('limits')}, redis {version('redis')} (server {redis_server or 'unavailable'}), "
        f"cython {version('cython')}, msgspec {version('msgspec')}",
        f"keysvc: {keysvc_revision()}; twins: _core_c COMPILED={core_c.COMPILED}, _core_py COMPILED={core_py.COMPILED}",
        f"mode: {mode_name}: {mode.repeats} repeats per workload, batches of about {mode.batch_seconds * 1000:.0f} ms, "
        f"scale {mode.small_keys:,} vs {mode.large_keys:,} keys",
    ]
    warning = stale_extension_warning()
    if warning:
        lines.append(warning)
    return lines


# -- stores and keys ------------------------------------------------------------------------------


class Stores:
    """Fresh stores in temporary directories, closed and removed at the end."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="keysvc-bench-")
        self.opened = []

    def new(self, name):
        store = LmdbStore(StoreConfig(data_dir=os.path.join(self.root, name)))
        self.opened.append(store)
        management = Management(store)
        api = management.create_api(f"bench-{name}")
        return store, management, api

    def close(self):
        for store in self.opened:
            store.close()
        shutil.rmtree(self.root, ignore_errors=True)


def key_spec(api_id, ratelimit, credits):
    return KeySpec(
        api_id=api_id,
        credits=CreditsSpec(remaining=HUGE_CREDITS) if credits else None,
        ratelimits=[RatelimitSpec("requests", HUGE_LIMIT, DURATION_MS, True)] if ratelimit else [],
    )


def import_many(management, api_id, count):
    """`count` keys with a ratelimit and credits, by digest, in batches: (plaintexts, key ids)."""
    spec = key_spec(api_id, ratelimit=True, credits=True)
    plaintexts = []
    key_ids = []
    while len(plaintexts) < count:
        items = []
        for _ in range(min(IMPORT_BATCH, count - len(plaintexts))):
            plaintext, start = generate_key("sk", 16)
            plaintexts.append(plaintext)
            items.append((spec, key_digest(plaintext), "blake3", start))
        key_ids.extend(key.id for key in management.import_keys(items))
    return plaintexts, key_ids


# -- timed batches --------------------------------------------------------------------------------


def now_ms():
    return time.time_ns() // 1_000_000


def time_verify(verifier, keys):
    """Seconds to verify `keys` in order; the last result must be VALID."""
    verify = verifier.verify
    now = now_ms()
    result = None
    start = perf_counter()
    for key in keys:
        result = verify(key, now)
    elapsed = perf_counter() - start
    if result is None or not result.valid:
        raise BenchError(f"verification was {result.code if result else None}, not VALID")
    return elapsed


def one_key(verifier, plaintext):
    def run(n):
        return time_verify(verifier, [plaintext] * n)

    return run


def random_keys(verifier, plaintexts, length, seed):
    """Keys drawn at random among all stored ones (the order fixed in advance), in slices."""
    rng = random.Random(seed)
    order = [plaintexts[rng.randrange(len(plaintexts))] for _ in range(length)]
    position = 0

    def run(n):
        nonlocal position
        if n > length:
            raise BenchError(f"a batch of {n} is longer than the random order ({length})")
        if position + n > length:
            position = 0
        keys = order[position:position + n]
        position += n
        return time_verify(verifier, keys)

    return run


def our_limiter(verifier, bucket):
    items = [(bucket, HUGE_LIMIT, DURATION_MS, 1)]

    def run(n):
        limit = verifier.limit
        now = now_ms()
        passed = False
        start = perf_counter()
        for _ in itertools.repeat(None, n):
            passed, _outcomes = limit(items, now)
        elapsed = perf_counter() - start
        if not passed:
            raise BenchError("our limiter denied")
        return elapsed

    return run


def limits_limiter(storage, identifier):
    import limits

    limiter = limits.strategies.SlidingWindowCounterRateLimiter(storage)
    item = limits.RateLimitItemPerMinute(1_000_000_000)

    def run(n):
        hit = limiter.hit
        passed = False
        start = perf_counter()
        for _ in itertools.repeat(None, n):
            passed = hit(item, "bench", identifier)
        elapsed = perf_counter() - start
        if not passed:
            raise BenchError("limits denied")
        return elapsed

    return run


def calibrate(run, seconds):
    """Operations per batch so that a batch takes about `seconds` (also warms the workload up)."""
    n = 100
    while True:
        elapsed = run(n)
        if elapsed >= seconds / 5 or n >= 10_000_000:
            return max(100, int(n * seconds / elapsed))
        n *= 4


# -- the workloads ----------------------------------------------------------------------------------


@dataclass
class Workload:
    id: str
    label: str
    run: object = None  # run(n) -> seconds; None when unavailable
    optional: bool = False  # an error makes it "unavailable" instead of stopping the run
    note: str = ""
    n: int = 0
    per_op_us: list = field(default_factory=list)
    verifier: object = None  # the scale rows': its misses must not grow while timed
    misses_after_warming: int = 0

    @property
    def median_us(self):
        return statistics.median(self.per_op_us) if self.per_op_us else None


VERIFY_KINDS = (
    ("valid key, no ratelimit, no credits", False, False),
    ("+ 1 auto-applied ratelimit", True, False),
    ("+ ratelimit and credits", True, True),
)


def verify_workloads(stores):
    workloads = []
    for twin, core, first in (("compiled", core_c, 1), ("python", core_py, 4)):
        for i, (label, ratelimit, credits) in enumerate(VERIFY_KINDS):
            store, management, api = stores.new(f"{twin}-{i}")
            _, plaintext = management.create_key(key_spec(api.id, ratelimit, credits))
            verifier = core.Verifier(store, cache_size=1000)
            workloads.append(Workload(str(first + i), f"{twin}: {label}", one_key(verifier, plaintext)))
    return workloads


def limiter_workloads(stores):
    store, _, _ = stores.new("limiter")
    bucket = core_c.bucket_key(core_c.NAMESPACE_LIMITS, "bench", "user_1", DURATION_MS)
    workloads = [Workload("7a", "ratelimit only: ours, compiled Verifier.limit (LMDB)",
                          our_limiter(core_c.Verifier(store), bucket))]

    import limits

    workloads.append(Workload("7b", "ratelimit only: limits SlidingWindowCounter, MemoryStorage",
                              limits_limiter(limits.storage.MemoryStorage(), "user_1")))
    redis_row = Workload("7c", "ratelimit only: limits SlidingWindowCounter, RedisStorage", optional=True)
    try:
        storage = limits.storage.RedisStorage(REDIS_URL, socket_connect_timeout=1, socket_timeout=5)
        if not storage.check():
            raise BenchError(f"no answer to PING at {REDIS_URL}")
        # A name of this run alone, so that counts left by earlier runs never come near the limit.
        identifier = f"user_1-{os.getpid()}-{time.time_ns()}"
        redis_row.run = limits_limiter(storage, identifier)
    except Exception as exc:  # a missing server, a refused connection, a missing client library
        redis_row.note = f"{type(exc).__name__}: {exc}"
    workloads.append(redis_row)
    return workloads


def scale_workloads(stores, mode):
    workloads = []
    for tag, count in (("8a", mode.small_keys), ("8b", mode.large_keys)):
        store, management, api = stores.new(f"scale-{count}")
        started = perf_counter()
        plaintexts, _ = import_many(management, api.id, count)
        imported = perf_counter() - started
        verifier = core_c.Verifier(store, cache_size=count + 1000)
        shuffled = random.Random(count).sample(plaintexts, count)
        started = perf_counter()
        time_verify(verifier, shuffled)  # every record cached, every rate-limit cell written
        warmed = perf_counter() - started
        if verifier.cache_len() != count:
            raise BenchError(f"the cache holds {verifier.cache_len()} of {count} keys after warming")
        # Enough keys in the order for every batch to draw fresh ones, within a bound on memory.
        length = min(max(20 * int(mode.batch_seconds / 2e-6), 100_000), 2_000_000)
        print(f"  {count:>9,} keys: imported in {imported:.1f} s, cache warmed in {warmed:.1f} s", file=sys.stderr)
        workloads.append(Workload(
            tag, f"scale: compiled, ratelimit and credits, {count:,} keys, random key each call",
            random_keys(verifier, plaintexts, length, seed=count),
            verifier=verifier, misses_after_warming=verifier.misses,
        ))
    return workloads


def measure(workloads, mode):
    """Calibrate each workload, then time them round-robin, `repeats` rounds."""
    for w in workloads:
        if w.run is None:
            continue
        try:
            w.n = calibrate(w.run, mode.batch_seconds)
        except Exception as exc:
            if not w.optional:
                raise
            w.run, w.note = None, f"{type(exc).__name__}: {exc}"
    for _ in range(mode.repeats):
        for w in workloads:
            if w.run is None:
                continue
            try:
                elapsed = w.run(w.n)
            except Exception as exc:  # e.g. Redis went away mid-run
                if not w.optional:
                    raise
                w.run, w.note = None, f"{type(exc).__name__}: {exc}"
                w.per_op_us.clear()
                continue
            w.per_op_us.append(elapsed / w.n * 1e6)


# -- the table ------------------------------------------------------------------------------------


def fmt_us(us):
    return f"{us:.2f}" if us < 100 else f"{us:.0f}"


TARGETS = {
    "3": "<= 5.00 us",
    "4": "compiled >= 3x", "5": "compiled >= 3x", "6": "compiled >= 3x",
    "7b": "ours >= 1x", "7c": "ours >= 20x",
    "8b": "<= 1.20x",
}


def judge(rows):
    """{workload id: (ratio text, PASS/FAIL)}, from the medians."""
    m = {w.id: w.median_us for w in rows}
    out = {}

    def ratio(row, text, x, ok):
        out[row] = (f"{text} {x:.2f}x", "PASS" if ok else "FAIL")

    if m.get("3") is not None:
        out["3"] = ("—", "PASS" if m["3"] <= 5.0 else "FAIL")
    for py, c in (("4", "1"), ("5", "2"), ("6", "3")):
        if m.get(py) is not None and m.get(c) is not None:
            ratio(py, f"compiled ({c}) faster:", m[py] / m[c], m[py] / m[c] >= 3.0)
    if m.get("7a") is not None:
        if m.get("7b") is not None:
            ratio("7b", "ours (7a) faster:", m["7b"] / m["7a"], m["7b"] / m["7a"] >= 1.0)
        if m.get("7c") is not None:
            ratio("7c", "ours (7a) faster:", m["7c"] / m["7a"], m["7c"] / m["7a"] >= 20.0)
    if m.get("8a") is not None and m.get("8b") is not None:
        ratio("8b", "slower than 8a:", m["8b"] / m["8a"], m["8b"] / m["8a"] <= 1.20)
    return out


def table(workloads):
    verdicts = judge(workloads)
    lines = [
        "| # | workload | median us/op | ops/s | min-max us/op | ratio (medians) | target | result |",
        "| --- | --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for w in workloads:
        ratio, result = verdicts.get(w.id, ("—", ""))
        target = TARGETS.get(w.id, "—")
        if w.median_us is None:
            label = "redis: unavailable" if w.id == "7c" else f"{w.label}: unavailable"
            lines.append(f"| {w.id} | {label} ({w.note}) | — | — | — | — | {target} | n/a |")
            continue
        lo, hi = min(w.per_op_us), max(w.per_op_us)
        lines.append(
            f"| {w.id} | {w.label} | {fmt_us(w.median_us)} | {1e6 / w.median_us:,.0f} | "
            f"{fmt_us(lo)}-{fmt_us(hi)} | {ratio} | {target} | {result} |"
        )
    return "\n".join(lines)


def scale_check(workloads):
    """All scale lookups must have been cache hits."""
    notes = []
    for w in workloads:
        if w.verifier is not None:
            extra = w.verifier.misses - w.misses_after_warming
            if extra:
                notes.append(f"WARNING: {w.id} had {extra} cache misses after warming")
    return notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer keys and repeats, for CI smoke runs")
    args = parser.parse_args()
    mode_name, mode = ("quick", QUICK) if args.quick else ("full", FULL)
    if not core_c.COMPILED:
        sys.exit("keysvc._fast._core_c is not compiled: build the extension first (pip install -e .)")

    header = machine_lines(mode_name, mode)
    started = perf_counter()
    stores = Stores()
    try:
        print("setting up stores ...", file=sys.stderr)
        workloads = verify_workloads(stores) + limiter_workloads(stores)
        workloads += scale_workloads(stores, mode)
        gc.collect()
        print("measuring ...", file=sys.stderr)
        measure(workloads, mode)
        notes = scale_check(workloads)
    finally:
        stores.close()

    print("# keysvc hot path: verifications per second, one process\n")
    for line in header:
        print(f"- {line}")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    print(f"- finished in {perf_counter() - started:.0f} s, peak RSS {peak_gb:.1f} GiB, "
          f"load average now {os.getloadavg()[0]:.2f}")
    print()
    print(table(workloads))
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
