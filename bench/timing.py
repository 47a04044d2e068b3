"""Does the time keys.verifyKey takes tell a caller anything its answer does not?

    .venv/bin/python bench/timing.py                     # full: about 20 s
    .venv/bin/python bench/timing.py --rounds 300 --core-calls 2000 --core-rounds 3    # smoke run, ~5 s
    .venv/bin/python bench/timing.py --url http://127.0.0.1:8080 --root-key unkey_root_...   # a running server

The same verifications, timed two ways:

1. Over HTTP, against a real `keysvc serve --workers 2` on a fresh data dir (or the server at --url, whose
   root key must hold api.*.create_api, api.*.create_key and api.*.verify_key). Over a few keep-alive
   connections, each round sends one request of every case below, in a random order, on one connection (so
   every case meets the same workers and the same background noise), and times it from the first byte sent to
   the last byte of the answer read (a raw socket client: no HTTP library in the timed part). Every answer is
   checked afterwards: VALID for the valid cases, exactly `{"valid": false, "code": "NOT_FOUND"}` for the others.
2. In process, at the core (`keysvc._fast.Verifier.verify`), for both twins (compiled and pure Python), on
   a fresh LmdbStore: batches of calls per case, the cases round-robin in a random order, median per call.

The cases:
- `valid`: a key with no ratelimit and no credits (the cheapest VALID: a hash and a cache hit);
- `valid_charged`: a key with one auto-applied ratelimit and credits (a write transaction of the counters);
- `unknown`: a random key of the same prefix and length, a fresh one every request (a hash, a cache miss and
  one LMDB read transaction that finds nothing: the attacker's case);
- `near_miss`: the valid key with its last 3 characters changed, a fresh variant every request (does a guess
  that is almost right take longer than a random one?);
- `out_of_scope`: a key that exists in another API, verified with a root key that may verify only its own
  API's keys (answered NOT_FOUND; skipped with --url, which has no way to make that root key).

Target (the exit code): over HTTP, the median of `unknown` within 2x of the median of `valid` and of
`valid_charged`, both ways. Exit 0 if met, 1 if not, 2 if the bench broke (a wrong answer, a server that
does not start).
"""
# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# Run as `python bench/timing.py`, this file's folder comes first on sys.path and bench/http.py would shadow
# the standard library's `http` package: move that folder last before anything imports it.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))  # last: the standard library first, bench/machine.py still found
sys.dont_write_bytecode = True  # no __pycache__ in bench/ for importing the sibling script

import argparse
import json
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from time import perf_counter, perf_counter_ns
from urllib.parse import urlsplit

from machine import bench_http, cpu_model, keysvc_revision, remove_unless_kept, run_script, version
bh = bench_http()  # bench/http.py's helpers


from keysvc.keys import generate_key

BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
PREFIX = "tm"
HUGE_LIMIT = 10**12
HUGE_CREDITS = 10**15
DURATION_MS = 60_000
TARGET = 2.0  # unknown's median within 2x of each VALID case's, both ways
CASES = ("valid", "valid_charged", "unknown", "near_miss", "out_of_scope")
NOT_FOUND = {"valid": False, "code": "NOT_FOUND"}


class BenchError(Exception):
    pass


# -- keys ------------------------------------------------------------------------------------------


def unknown_keys(like: str, count: int) -> list[str]:
    """Random keys (from the OS CSPRNG, as keysvc makes them) with the same prefix and length as `like`."""
    prefix = like.rpartition("_")[0]
    out: list[str] = []
    while len(out) < count:
        key, _ = generate_key(prefix or None, 16)
        if len(key) == len(like) and key != like:
            out.append(key)
    return out


def near_misses(key: str, count: int, rng: random.Random) -> list[str]:
    """`key` with its last 3 characters replaced at random (never `key` itself)."""
    out: list[str] = []
    while len(out) < count:
        variant = key[:-3] + "".join(rng.choice(BASE58) for _ in range(3))
        if variant != key:
            out.append(variant)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- over HTTP ---------------------------------------------------------------------------------------


class Conn:
    """One keep-alive HTTP/1.1 connection on a raw socket: send prepared bytes, read one answer."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BenchError("the server closed a keep-alive connection")
        self.buf += chunk

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        head = self.buf[:end]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buf) < end + 4 + length:
            self._more()
        body = self.buf[end + 4:end + 4 + length]
        self.buf = self.buf[end + 4 + length:]
        return int(head.split(b" ", 2)[1]), body

    def close(self) -> None:
        self.sock.close()


def verify_request(host: str, port: int, root_key: str, key: str) -> bytes:
    body = json.dumps({"key": key}, separators=(",", ":")).encode()
    return (f"POST /v2/keys.verifyKey HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {root_key}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def check_answer(case: str, status: int, body: bytes) -> str | None:
    """None if the answer is what the case expects, else what is wrong."""
    if status != 200:
        return f"{case}: HTTP {status}: {body[:200]!r}"
    data = json.loads(body).get("data")
    if case.startswith("valid"):
        if not (isinstance(data, dict) and data.get("valid") is True and data.get("code") == "VALID"):
            return f"{case}: not VALID: {body[:200]!r}"
    elif data != NOT_FOUND:
        return f"{case}: not exactly NOT_FOUND: {body[:200]!r}"
    return None


def http_cases(host: str, port: int, root_key: str, scoped_root: str | None, keys: dict[str, str],
               rounds: int, rng: random.Random) -> dict[str, list[bytes]]:
    """The prepared requests of every case, one per round (plus warm-up), fresh keys where it matters."""
    n = rounds
    requests = {
        "valid": [verify_request(host, port, root_key, keys["valid"])] * n,
        "valid_charged": [verify_request(host, port, root_key, keys["valid_charged"])] * n,
        "unknown": [verify_request(host, port, root_key, k) for k in unknown_keys(keys["valid"], n)],
        "near_miss": [verify_request(host, port, root_key, k) for k in near_misses(keys["valid"], n, rng)],
    }
    if scoped_root is not None:
        requests["out_of_scope"] = [verify_request(host, port, scoped_root, keys["other_api"])] * n
    return requests


def run_http(host: str, port: int, requests: dict[str, list[bytes]], rounds: int, warmup: int,
             connections: int, rng: random.Random) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Latencies in microseconds per case, and the size of each case's last answer."""
    conns = [Conn(host, port) for _ in range(connections)]
    cases = list(requests)
    latencies: dict[str, list[float]] = {case: [] for case in cases}
    sizes: dict[str, int] = {}
    errors: list[str] = []
    try:
        for r in range(warmup + rounds):
            conn = conns[r % len(conns)]
            order = cases[:]
            rng.shuffle(order)
            for case in order:
                request = requests[case][r % len(requests[case])]
                started = perf_counter_ns()
                status, body = conn.exchange(request)
                elapsed = perf_counter_ns() - started
                problem = check_answer(case, status, body)
                if problem:
                    errors.append(problem)
                    if len(errors) >= 5:
                        raise BenchError("wrong answers:\n  " + "\n  ".join(errors))
                if r >= warmup:
                    latencies[case].append(elapsed / 1000)
                sizes[case] = len(body)
    finally:
        for conn in conns:
            conn.close()
    if errors:
        raise BenchError("wrong answers:\n  " + "\n  ".join(errors))
    return latencies, sizes


# -- in process, at the core ---------------------------------------------------------------------------


def run_core(twin_name: str, calls: int, rounds: int, rng: random.Random) -> dict[str, list[float]]:
    """Median-ready per-call microseconds of each case, one value per round, for one twin."""
    import importlib

    from keysvc.management import CreditsSpec, KeySpec, Management, RatelimitSpec
    from keysvc.store.lmdb import LmdbStore, StoreConfig

    twin = importlib.import_module(twin_name)
    tmp = tempfile.mkdtemp(prefix="keysvc-timing-core-")
    store = LmdbStore(StoreConfig(data_dir=tmp, map_size=1 << 30, counters_map_size=1 << 28))
    try:
        manage = Management(store)
        api_a = manage.create_api("timing-a")
        api_b = manage.create_api("timing-b")
        _, plain = manage.create_key(KeySpec(api_id=api_a.id, prefix=PREFIX))
        _, charged = manage.create_key(KeySpec(
            api_id=api_a.id, prefix=PREFIX, credits=CreditsSpec(remaining=HUGE_CREDITS),
            ratelimits=[RatelimitSpec("requests", HUGE_LIMIT, DURATION_MS, True)]))
        _, other = manage.create_key(KeySpec(api_id=api_b.id, prefix=PREFIX))
        verifier = twin.Verifier(store)
        scope_a = frozenset({api_a.id})
        expect = {"valid": "VALID", "valid_charged": "VALID", "unknown": "NOT_FOUND", "near_miss": "NOT_FOUND",
                  "out_of_scope": "NOT_FOUND"}

        def batch(case: str) -> float:
            verify = verifier.verify
            now = time.time_ns() // 1_000_000
            result = None
            if case in ("unknown", "near_miss"):
                keys = unknown_keys(plain, calls) if case == "unknown" else near_misses(plain, calls, rng)
                started = perf_counter()
                for key in keys:
                    result = verify(key, now)
            elif case == "out_of_scope":
                started = perf_counter()
                for _ in range(calls):
                    result = verify(other, now, None, -1, None, scope_a)
            else:
                key = plain if case == "valid" else charged
                started = perf_counter()
                for _ in range(calls):
                    result = verify(key, now)
            elapsed = perf_counter() - started
            if result is None or result.code != expect[case]:
                raise BenchError(f"core {twin_name} {case}: {result.code if result else None}, "
                                 f"not {expect[case]}")
            return elapsed / calls * 1e6

        for case in CASES:  # warm: every key cached, the LMDB pages touched
            batch(case)
        per_call: dict[str, list[float]] = {case: [] for case in CASES}
        for _ in range(rounds):
            order = list(CASES)
            rng.shuffle(order)
            for case in order:
                per_call[case].append(batch(case))
        return per_call
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- the run ---------------------------------------------------------------------------------------------


def fmt_us(us: float) -> str:
    return f"{us:,.1f}" if us >= 10 else f"{us:.2f}"


def ratio_ok(ratio: float) -> bool:
    return 1 / TARGET <= ratio <= TARGET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running keysvc (default: start `keysvc serve` on a fresh data dir)")
    parser.add_argument("--root-key", help="with --url: a root key that may create APIs and keys and verify")
    parser.add_argument("--workers", type=int, default=2, help="workers of the server it starts (default 2)")
    parser.add_argument("--rounds", type=int, default=5000, help="HTTP rounds, one request per case (default 5000)")
    parser.add_argument("--warmup", type=int, default=200, help="HTTP rounds not counted (default 200)")
    parser.add_argument("--connections", type=int, default=4, help="keep-alive connections (default 4)")
    parser.add_argument("--core-calls", type=int, default=20_000, help="calls per core batch (default 20000)")
    parser.add_argument("--core-rounds", type=int, default=15, help="core batches per case and twin (default 15)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data dir, server log)")
    args = parser.parse_args()
    if args.url and not args.root_key:
        parser.error("--url needs --root-key")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    rng = random.Random(args.seed)
    started = time.monotonic()

    print("# keysvc timing bench: keys.verifyKey of VALID keys against NOT_FOUND ones")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
          f"load average {os.getloadavg()[0]:.2f} (the client, the server and anything else share the cores)")
    print(f"python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    print(f"granian {version('granian')}, uvloop {version('uvloop')}, msgspec {version('msgspec')}, "
          f"lmdb {version('lmdb')}, blake3 {version('blake3')}")
    print(f"keysvc {version('keysvc')} at {keysvc_revision()}, core: {bh.compiled_core()}")
    print(f"run: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print()

    tmp = Path(tempfile.mkdtemp(prefix="keysvc-timing-"))
    server = None
    try:
        if args.url:
            split = urlsplit(args.url)
            host, port = split.hostname or "127.0.0.1", split.port or 80
            root_key, scoped_root = args.root_key, None
            where = f"the server at {args.url}"
        else:
            host, port = bh.HOST, bh.free_port()
            data_dir = tmp / "data"
            root_key = bh.create_root_key(data_dir)
            argv = [bh.PYTHON, "-m", "keysvc", "serve", "--workers", str(args.workers), "--host", host,
                    "--port", str(port), "--data-dir", str(data_dir)]
            server = bh.Server("keysvc serve", argv, port, tmp / "serve.log", "/v2/liveness")
            server.start()
            where = f"`keysvc serve --workers {args.workers}` on a fresh data dir (analytics on, the default)"
        call = lambda path, body: bh.call(port, root_key, path, body)["data"]  # noqa: E731
        api_a = call("/v2/apis.createApi", {"name": "timing-a"})["apiId"]
        api_b = call("/v2/apis.createApi", {"name": "timing-b"})["apiId"]
        keys = {
            "valid": call("/v2/keys.createKey", {"apiId": api_a, "prefix": PREFIX})["key"],
            "valid_charged": call("/v2/keys.createKey", {
                "apiId": api_a, "prefix": PREFIX, "credits": {"remaining": HUGE_CREDITS},
                "ratelimits": [{"name": "requests", "limit": HUGE_LIMIT, "duration": DURATION_MS,
                                "autoApply": True}]})["key"],
            "other_api": call("/v2/keys.createKey", {"apiId": api_b, "prefix": PREFIX})["key"],
        }
        if server is not None:
            out = subprocess.run([bh.PYTHON, "-m", "keysvc", "root-key", "create", "--data-dir", str(tmp / "data"),
                                  "--permission", f"api.{api_a}.verify_key"],
                                 capture_output=True, text=True, timeout=120, cwd=bh.REPO)
            if out.returncode != 0:
                raise BenchError(f"root-key create failed:\n{out.stderr}")
            scoped_root = out.stdout.strip().splitlines()[-1]

        requests = http_cases(host, port, root_key, scoped_root, keys, args.warmup + args.rounds, rng)
        print(f"## 1. over HTTP: {where}")
        print()
        print(f"- {args.rounds:,} rounds (+ {args.warmup} not counted) over {args.connections} keep-alive "
              f"connection(s); each round sends every case once, in a random order, on one connection")
        print(f"- keys: prefix `{PREFIX}_`, {len(keys['valid'])} characters; unknown and near-miss keys are fresh "
              f"for every request; out_of_scope: a key of API B, verified with a root key holding only "
              f"api.<API A>.verify_key" + ("" if scoped_root else " (skipped: --url)"))
        print("- time: from the first byte of the request sent to the last byte of the answer read, in us")
        print()
        latencies, sizes = run_http(host, port, requests, args.rounds, args.warmup, args.connections, rng)
        if server is not None and (server.process is None or server.process.poll() is not None):
            raise BenchError(f"keysvc serve died:\n{server.log()}")
        med = {case: statistics.median(values) for case, values in latencies.items()}
        print("| case | answer | answer bytes | median us | p90 us | p99 us | requests | median / unknown's |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for case in CASES:
            if case not in latencies:
                continue
            values = latencies[case]
            answer = "VALID" if case.startswith("valid") else "NOT_FOUND"
            print(f"| {case} | {answer} | {sizes[case]} | {fmt_us(med[case])} | {fmt_us(percentile(values, 0.9))} | "
                  f"{fmt_us(percentile(values, 0.99))} | {len(values):,} | {med[case] / med['unknown']:.2f} |")
        print()
        verdicts = []
        print("| target | measured | result |")
        print("| --- | --- | --- |")
        for valid_case in ("valid", "valid_charged"):
            ratio = med["unknown"] / med[valid_case]
            good = ratio_ok(ratio)
            verdicts.append(good)
            print(f"| HTTP median: unknown / {valid_case} within {1 / TARGET:.1f}-{TARGET:.1f} | {ratio:.2f} | "
                  f"{'PASS' if good else 'FAIL'} |")
        print(f"| (not a target) near_miss / unknown | {med['near_miss'] / med['unknown']:.2f} | |")
        if "out_of_scope" in med:
            print(f"| (not a target) out_of_scope / unknown | {med['out_of_scope'] / med['unknown']:.2f} | |")
        print()
        if server is not None:
            server.stop()
            server = None

        print(f"## 2. in process: Verifier.verify, {args.core_rounds} batches of {args.core_calls:,} calls per case "
              f"and twin, round-robin in a random order; median us per call")
        print()
        core = {name: run_core(module, args.core_calls, args.core_rounds, rng)
                for name, module in (("compiled", "keysvc._fast._core_c"), ("python", "keysvc._fast._core_py"))}
        print("| case | compiled us | compiled / unknown's | pure-Python us | pure-Python / unknown's |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for case in CASES:
            cells = []
            for name in ("compiled", "python"):
                m = statistics.median(core[name][case])
                u = statistics.median(core[name]["unknown"])
                cells += [fmt_us(m), f"{m / u:.2f}"]
            print(f"| {case} | " + " | ".join(cells) + " |")
        print()
        print(f"finished in {time.monotonic() - started:.0f} s, load average now {os.getloadavg()[0]:.2f}")
        return 0 if all(verdicts) else 1
    finally:
        if server is not None:
            server.stop()
        remove_unless_kept(tmp, args.keep)


if __name__ == "__main__":
    run_script(main, (BenchError, bh.BenchError))
