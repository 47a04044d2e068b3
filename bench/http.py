"""How close does `keysvc serve` come to the HTTP ceiling on keys.verifyKey?

    .venv/bin/python bench/http.py [--workers 2] [--duration 10] [--rounds 2] [--connections 32]

In one run: a fresh data dir, a root key, and (through the HTTP API) an API and one key with an
auto-applied ratelimit that never denies and credits that never run out; then `keysvc serve` and a
bare Granian ASGI app (bench/raw_asgi.py, the ceiling, started with the same Granian flags and
worker count) are each loaded with wrk in turn, A B A B ..., by POSTing keys.verifyKey for that key.
Both servers answer one plain request first (keysvc: 200 VALID); afterwards wrk must report no
non-2xx answers and no socket errors, and the key's credits must have gone down by about as many
verifications as wrk completed. Prints the machine, the exact commands, every round, and a table
of the medians with the targets: keysvc req/s >= 0.8 x ceiling and keysvc p99 < 2 x ceiling p99.
"""
# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# Run as `python bench/http.py`, this file's folder comes first on sys.path and its name would
# shadow the standard library's `http` package: move that folder last before anything imports `http`.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))  # last: the standard library first, bench/machine.py still found

import argparse
import http.client
import json
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from machine import REPO, cpu_model, keysvc_revision, remove_unless_kept, run_script, version

PYTHON = sys.executable
GRANIAN = str(Path(PYTHON).parent / "granian")
HOST = "127.0.0.1"
HUGE_LIMIT = 10**12  # never reached in a 60 s window
HUGE_CREDITS = 10**15  # never run out
DURATION_MS = 60_000
WARMUP_SECONDS = 2
RPS_TARGET = 0.8  # keysvc req/s >= 0.8 x ceiling
P99_TARGET = 2.0  # keysvc p99 < 2 x ceiling p99


# Benches may run servers side by side: none takes the default metrics port (set it to measure it).
BENCH_ENV = {"KEYSVC_METRICS__PORT": "null"}


class BenchError(Exception):
    pass


# -- the machine ----------------------------------------------------------------------------------






def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"




def compiled_core() -> str:
    try:
        from keysvc._fast import COMPILED

        return "compiled" if COMPILED else "pure Python"
    except Exception as exc:  # noqa: BLE001 - only a label
        return f"unknown ({exc})"


# -- servers ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Server:
    """A server process in its own session, so that it and its workers can be stopped together."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, ready_path: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.ready_path = ready_path
        self.env = env
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 30.0) -> None:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**BENCH_ENV, **os.environ, **(self.env or {})}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if request(self.port, "GET", self.ready_path)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not answer within {timeout} s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return []
        return [int(pid) for pid in children]

    def log(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the server (Granian stops its workers), then SIGKILL to its whole session."""
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # any worker left behind; the group is ours
            except (ProcessLookupError, PermissionError):
                pass
            if process.poll() is None:
                process.wait(5)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            self.process = None


def ceiling_argv(workers: int, port: int) -> list[str]:
    """The ceiling: bench/raw_asgi.py under the flags keysvc/cli/serve.py passes to Granian(...), spelled as
    Granian's command line. Started as Server(..., ready_path="/")."""
    return [GRANIAN, "--interface", "asgi", "--loop", "uvloop", "--http", "auto", "--no-ws", "--workers", str(workers),
            "--respawn-failed-workers", "--respawn-interval", "0.5", "--workers-kill-timeout", "10",
            "--log-level", "warning", "--host", HOST, "--port", str(port), "--working-dir", str(REPO),
            "bench.raw_asgi:app"]


# -- the key ----------------------------------------------------------------------------------------


def create_root_key(data_dir: Path) -> str:
    out = subprocess.run([PYTHON, "-m", "keysvc", "root-key", "create", "--data-dir", str(data_dir)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise BenchError(f"root-key create failed ({out.returncode}):\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def call(port: int, root_key: str, path: str, body: dict) -> dict:
    status, payload = request(port, "POST", path, json.dumps(body).encode(),
                              {"content-type": "application/json", "authorization": f"Bearer {root_key}"})
    if status != 200:
        raise BenchError(f"{path} answered {status}: {payload[:500]!r}")
    return json.loads(payload)


def create_bench_key(port: int, root_key: str) -> tuple[str, str]:
    api_id = call(port, root_key, "/v2/apis.createApi", {"name": "http-bench"})["data"]["apiId"]
    data = call(port, root_key, "/v2/keys.createKey", {
        "apiId": api_id,
        "name": "bench key",
        "credits": {"remaining": HUGE_CREDITS},
        "ratelimits": [{"name": "requests", "limit": HUGE_LIMIT, "duration": DURATION_MS, "autoApply": True}],
    })["data"]
    return data["keyId"], data["key"]


def verify_body(key: str) -> bytes:
    return json.dumps({"key": key}, separators=(",", ":")).encode()


def check_verify(port: int, root_key: str, body: bytes) -> dict:
    status, payload = request(port, "POST", "/v2/keys.verifyKey", body,
                              {"content-type": "application/json", "authorization": f"Bearer {root_key}"})
    if status != 200:
        raise BenchError(f"verifyKey answered {status}: {payload[:500]!r}")
    answer = json.loads(payload)
    data = answer.get("data", {})
    if not data.get("valid") or data.get("code") != "VALID":
        raise BenchError(f"verifyKey did not answer VALID: {payload[:500]!r}")
    limits = data.get("ratelimits") or []
    if len(limits) != 1 or limits[0].get("exceeded") or not limits[0].get("autoApply"):
        raise BenchError(f"verifyKey did not apply the one never-exceeded ratelimit: {payload[:500]!r}")
    answer["_bytes"] = len(payload)
    return answer


# -- wrk ------------------------------------------------------------------------------------------


def lua_script(path: Path, body: bytes, root_key: str) -> None:
    def lua_str(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {lua_str(body.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = {lua_str("Bearer " + root_key)}\n'
    )


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise BenchError(f"cannot read the duration {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def parse_wrk(out: str) -> dict:
    result: dict = {"non2xx": 0, "socket_errors": 0}
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    done = re.search(r"^\s*(\d+) requests in", out, re.M)
    if not rps or not done:
        raise BenchError(f"cannot read wrk's output:\n{out}")
    result["rps"] = float(rps.group(1))
    result["requests"] = int(done.group(1))
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s*{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
        if not match:
            raise BenchError(f"no {pct}% latency in wrk's output (--latency missing?):\n{out}")
        result[f"p{pct}"] = to_ms(match.group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        result["non2xx"] = int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        result["socket_errors"] = sum(int(n) for n in sock.groups())
        result["socket_detail"] = sock.group(0)
    return result


def wrk_argv(args: argparse.Namespace, script: Path, port: int, duration: int) -> list[str]:
    return ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration}s", "--latency",
            "-s", str(script), f"http://{HOST}:{port}/v2/keys.verifyKey"]


def run_wrk(argv: list[str], duration: int) -> dict:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    result = parse_wrk(out.stdout)
    result["raw"] = out.stdout
    return result


# -- the run ----------------------------------------------------------------------------------------


def fmt_ms(ms: float) -> str:
    return f"{ms:.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="Granian workers for both servers (default 2)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data, logs, wrk script)")
    parser.add_argument("--wrk-output", action="store_true", help="print wrk's full output for every run")
    args = parser.parse_args()
    # A SIGTERM to the bench unwinds like Ctrl-C, through the finally that stops both servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not on PATH")

    tmp = Path(tempfile.mkdtemp(prefix="keysvc-http-bench-"))
    data_dir = tmp / "data"
    keysvc_port, raw_port = free_port(), free_port()
    n = str(args.workers)
    keysvc_argv = [PYTHON, "-m", "keysvc", "serve", "--workers", n, "--host", HOST, "--port", str(keysvc_port),
                   "--data-dir", str(data_dir)]
    raw_argv = ceiling_argv(args.workers, raw_port)
    script = tmp / "verify.lua"
    servers = {
        "keysvc": Server("keysvc serve", keysvc_argv, keysvc_port, tmp / "keysvc.log", "/v2/liveness"),
        "ceiling": Server("raw ASGI", raw_argv, raw_port, tmp / "raw.log", "/"),
    }
    results: dict[str, list[dict]] = {"keysvc": [], "ceiling": []}
    try:
        print("# keysvc HTTP bench: keys.verifyKey against the raw Granian ASGI ceiling")
        print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        print(f"cpu: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
              f"load average {os.getloadavg()[0]:.2f} (wrk and the servers share the cores)")
        print(f"python: {platform.python_implementation()} {platform.python_version()} ({PYTHON})")
        print(f"granian {version('granian')}, uvloop {version('uvloop')}, msgspec {version('msgspec')}, "
              f"lmdb {version('lmdb')}, {wrk_version()}")
        print(f"keysvc {version('keysvc')} at {keysvc_revision()}, core: {compiled_core()}")
        print(f"workers {args.workers}, wrk {args.threads} thread(s) x {args.connections} connections, "
              f"{args.duration} s per run, {args.rounds} round(s), {WARMUP_SECONDS} s warm-up per server")
        print()

        root_key = create_root_key(data_dir)
        servers["keysvc"].start()
        key_id, key = create_bench_key(keysvc_port, root_key)
        body = verify_body(key)
        lua_script(script, body, root_key)
        first = check_verify(keysvc_port, root_key, body)
        credits_before = first["data"]["credits"]
        servers["ceiling"].start()
        status, payload = request(raw_port, "POST", "/v2/keys.verifyKey", body,
                                  {"content-type": "application/json", "authorization": "Bearer x"})
        if status != 200 or not json.loads(payload)["data"]["valid"]:
            raise BenchError(f"the raw ASGI app answered {status}: {payload[:300]!r}")

        print("commands:")
        print(f"  keysvc:  {shlex.join(keysvc_argv)}")
        print(f"  ceiling: {shlex.join(raw_argv)}   (cwd {REPO})")
        print(f"  load:    {shlex.join(wrk_argv(args, script, 0, args.duration)).replace(':0/', ':<port>/')}")
        print(f"  {script.name}: POST /v2/keys.verifyKey, body {len(body)} bytes {{\"key\": <the bench key>}}, "
              f"Content-Type application/json, Authorization: Bearer <root key>")
        print(f"  bench key {key_id}: 1 auto-applied ratelimit ({HUGE_LIMIT} per {DURATION_MS} ms), "
              f"credits {HUGE_CREDITS}")
        print(f"  answers: keysvc {first['_bytes']} bytes (200 VALID), ceiling {len(payload)} bytes (fixed)")
        print()

        warmup = {name: run_wrk(wrk_argv(args, script, servers[name].port, WARMUP_SECONDS), WARMUP_SECONDS)
                  for name in ("keysvc", "ceiling")}

        failures = [f"warm-up {name}: {res['non2xx']} non-2xx/3xx answers" for name, res in warmup.items()
                    if res["non2xx"]]
        print("| round | server | req/s | p50 | p75 | p90 | p99 | requests | non-2xx | socket errors |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for rnd in range(1, args.rounds + 1):
            for name in ("keysvc", "ceiling"):
                server = servers[name]
                res = run_wrk(wrk_argv(args, script, server.port, args.duration), args.duration)
                results[name].append(res)
                print(f"| {rnd} | {name} | {res['rps']:,.0f} | {fmt_ms(res['p50'])} | {fmt_ms(res['p75'])} | "
                      f"{fmt_ms(res['p90'])} | {fmt_ms(res['p99'])} | {res['requests']:,} | {res['non2xx']} | "
                      f"{res['socket_errors']} |", flush=True)
                if args.wrk_output:
                    print(res["raw"])
                if res["non2xx"]:
                    failures.append(f"round {rnd} {name}: {res['non2xx']} non-2xx/3xx answers")
                if res["socket_errors"]:
                    failures.append(f"round {rnd} {name}: {res['socket_detail']}")
                if server.process is None or server.process.poll() is not None:
                    raise BenchError(f"{server.name} died during round {rnd}:\n{server.log()}")
        print()

        # Every verification charges 1 credit: the credits spent must match what wrk counted
        # (give or take the requests in flight when each wrk run stopped), else keysvc did not verify.
        last = check_verify(keysvc_port, root_key, body)
        spent = credits_before - last["data"]["credits"] - 1  # the check itself costs 1
        counted = warmup["keysvc"]["requests"] + sum(r["requests"] for r in results["keysvc"])
        slack = args.connections * (args.rounds + 1)  # requests in flight when each wrk run stopped
        check = "ok" if counted <= spent <= counted + slack else "MISMATCH"
        if check != "ok":
            failures.append(f"credits spent {spent:,}, wrk counted {counted:,} (+ up to {slack} in flight)")
        print(f"credits spent under load: {spent:,}; wrk counted {counted:,} answers (warm-up included, "
              f"+ up to {slack} in flight when wrk stopped): {check}")

        med = {name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
               for name, rs in results.items()}
        rps_ratio = med["keysvc"]["rps"] / med["ceiling"]["rps"]
        p99_ratio = med["keysvc"]["p99"] / med["ceiling"]["p99"]
        rps_ok, p99_ok = rps_ratio >= RPS_TARGET, p99_ratio < P99_TARGET
        print()
        print(f"## medians over {args.rounds} round(s)")
        print()
        print("| server | req/s | p50 | p99 |")
        print("| --- | --- | --- | --- |")
        for name, label in (("keysvc", "keysvc serve, keys.verifyKey"), ("ceiling", "raw Granian ASGI (ceiling)")):
            m = med[name]
            print(f"| {label} | {m['rps']:,.0f} | {fmt_ms(m['p50'])} | {fmt_ms(m['p99'])} |")
        print(f"| keysvc / ceiling | {rps_ratio:.2f} | {med['keysvc']['p50'] / med['ceiling']['p50']:.2f} | "
              f"{p99_ratio:.2f} |")
        print()
        print("| target | measured | result |")
        print("| --- | --- | --- |")
        print(f"| verifyKey req/s >= {RPS_TARGET} x ceiling | {rps_ratio:.2f} x | {'PASS' if rps_ok else 'FAIL'} |")
        print(f"| verifyKey p99 < {P99_TARGET} x ceiling p99 | {p99_ratio:.2f} x | {'PASS' if p99_ok else 'FAIL'} |")
        print(f"| no non-2xx answers, no socket errors, credits match | "
              f"{'; '.join(failures) or 'none'} | {'FAIL' if failures else 'PASS'} |")
        return 0 if (rps_ok and p99_ok and not failures) else 1
    finally:
        for server in servers.values():
            server.stop()
        remove_unless_kept(tmp, args.keep)


if __name__ == "__main__":
    run_script(main, (BenchError,))
