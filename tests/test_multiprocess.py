"""Several worker processes share one data dir and hammer one key, as the server's workers do.

Each worker is a fresh interpreter (the script below, written to tmp_path) that opens the store
itself after it starts, builds its own Verifier with the twin its environment selects, and
answers one JSON command a line on stdin with one JSON line on stdout. The parent (this
process) holds the store open too, through the conftest fixtures, like a management process.

- credits: N credits across 4 processes give exactly N VALID, each remaining balance N-1..0
  handed out exactly once, and leave 0 stored.
- rate limits: one auto-applied limit L gives exactly L VALID in total, the rest RATE_LIMITED.
- a disable, a re-enable and a delete made through Management are seen by the very next
  verification of every worker, although each holds the key in its cache.
- a verifier created while another process commits a change still sees that change once it has
  committed.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keysvc._fast import _core_c, _core_py
from keysvc.management import CreditsSpec, KeySpec, Management, RatelimitSpec, now_ms
from keysvc.store import LmdbStore

pytestmark = pytest.mark.slow

WORKERS = 4
START_TIMEOUT = 60.0  # interpreter start and imports; generous for a loaded 2-core machine
REPLY_TIMEOUT = 60.0  # no hammer takes more than a second or two; this only turns a hang into a failure
HOUR = 3_600_000

WORKER_SCRIPT = r'''
import json, os, sys

cfg = json.loads(sys.argv[1])
import keysvc._fast as fast
from keysvc.store import LmdbStore, StoreConfig

if fast.COMPILED is not cfg["compiled"]:
    sys.exit(f"wrong twin: keysvc._fast.COMPILED is {fast.COMPILED}, expected {cfg['compiled']}")
store = LmdbStore(StoreConfig(data_dir=cfg["data_dir"], map_size=cfg["map_size"],
                              counters_map_size=cfg["counters_map_size"]))
verifier = fast.Verifier(store)


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


reply({"ready": os.getpid(), "compiled": fast.COMPILED})
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "hammer":
        # Verify until `until` was answered `stop_after` times (or `max` calls, so a key that
        # never runs out cannot loop forever); report every code and, for each VALID, what it
        # left: the credit balance or the rate limit's remaining count.
        codes = {}
        left = []
        stops = calls = 0
        key, now, until = cmd["key"], cmd["now_ms"], cmd["until"]
        while stops < cmd["stop_after"] and calls < cmd["max"]:
            res = verifier.verify(key, now)
            calls += 1
            codes[res.code] = codes.get(res.code, 0) + 1
            if res.valid:
                left.append(res.credits if cmd["report"] == "credits" else res.ratelimits[0].remaining)
            elif res.code == until:
                stops += 1
        reply({"codes": codes, "left": left, "calls": calls})
    elif op == "verify":
        hits = verifier.hits
        res = verifier.verify(cmd["key"], cmd["now_ms"])
        reply({"code": res.code, "cache_hit": verifier.hits > hits,
               "key_id": None if res.key is None else res.key.key_id})
    elif op == "renew":
        verifier = fast.Verifier(store)  # a new verifier (empty cache) over the open store
        reply({"renewed": True})
    elif op == "disable_paused_before_commit":
        # Management.update_key as it is, held between the change log (and hint) being written
        # and the commit, until the parent sends a line: the window every write goes through.
        from keysvc.management import Management
        from keysvc.store.lmdb import WriteTxn

        log_changes = WriteTxn.log_changes

        def log_then_wait(self):
            log_changes(self)
            reply({"paused": "before commit"})
            sys.stdin.readline()

        WriteTxn.log_changes = log_then_wait
        try:
            Management(store).update_key(cmd["key_id"], enabled=False)
        finally:
            WriteTxn.log_changes = log_changes
        reply({"committed": True})
    elif op == "exit":
        break
store.close()
reply({"bye": os.getpid()})
'''


class Worker:
    """One worker process and a thread that reads its stdout, so no read can block forever."""

    def __init__(self, script: Path, cfg: dict[str, Any], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._stderr = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, env=env, text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def send(self, **cmd: Any) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"worker {self.proc.pid} did not answer within {timeout}s")
        if line is None:
            self.proc.wait(timeout=10)
            pytest.fail(f"worker {self.proc.pid} exited with {self.proc.returncode}: {self.log.read_text()}")
        return json.loads(line)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.recv()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="exit")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()


@pytest.fixture
def start_workers(tmp_path: Path, store: LmdbStore, twin) -> Iterator:
    """start_workers(n) -> n ready workers on the fixture's data dir; all stopped at teardown."""
    env, compiled = twin
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    cfg = {
        "data_dir": str(store.path), "compiled": compiled,
        "map_size": store.config.map_size, "counters_map_size": store.config.counters_map_size,
    }
    started: list[Worker] = []

    def start(n: int) -> list[Worker]:
        workers = [Worker(script, cfg, env, tmp_path / f"worker{len(started) + i}.log") for i in range(n)]
        started.extend(workers)
        for worker in workers:  # started all at once, then waited for
            hello = worker.recv(START_TIMEOUT)
            assert hello == {"ready": worker.proc.pid, "compiled": compiled}
        return workers

    yield start
    for worker in started:
        worker.stop()


def hammer(workers: list[Worker], **cmd: Any) -> list[dict[str, Any]]:
    """Send the same hammer to every worker before reading any answer, so they run together."""
    for worker in workers:
        worker.send(op="hammer", **cmd)
    return [worker.recv() for worker in workers]


def test_credits_are_charged_exactly_once_across_processes(manage: Management, store: LmdbStore, start_workers):
    n = 3000
    api = manage.create_api("mp")
    key, plaintext = manage.create_key(KeySpec(api_id=api.id, credits=CreditsSpec(remaining=n)))
    workers = start_workers(WORKERS)

    results = hammer(workers, key=plaintext, now_ms=now_ms(), until="USAGE_EXCEEDED", stop_after=20,
                     max=4 * n, report="credits")

    codes = sum((Counter(r["codes"]) for r in results), Counter())
    per_worker = [r["codes"].get("VALID", 0) for r in results]
    assert codes["VALID"] == n, (codes, per_worker)
    assert set(codes) == {"VALID", "USAGE_EXCEEDED"}, codes
    assert sum(1 for count in per_worker if count) >= 2, f"the workers did not race: {per_worker}"
    assert codes["USAGE_EXCEEDED"] >= WORKERS * 20
    # Each VALID left a balance one below the one before it, whichever process it ran in: every
    # balance from n-1 down to 0 was handed out exactly once (a lost update would repeat one).
    left = [balance for r in results for balance in r["left"]]
    assert sorted(left) == list(range(n))
    for r in results:  # and within one process the balance only ever went down
        assert r["left"] == sorted(r["left"], reverse=True)
    assert store.get_credits(key.id)[0] == 0
    assert manage.credits(manage.get_key(key.id)) == 0


def test_ratelimit_is_exact_across_processes(manage: Management, store: LmdbStore, start_workers, twin):
    core = _core_c if twin[1] else _core_py  # the parent checks with the workers' twin
    limit = 2000
    api = manage.create_api("mp")
    key, plaintext = manage.create_key(KeySpec(
        api_id=api.id, ratelimits=[RatelimitSpec(name="requests", limit=limit, duration=HOUR, auto_apply=True)],
    ))
    workers = start_workers(WORKERS)
    # One clock for every worker: verify takes the time as an argument, so all calls fall in the
    # same window and no window boundary can pass during the test, whatever the wall clock does.
    now = now_ms()

    results = hammer(workers, key=plaintext, now_ms=now, until="RATE_LIMITED", stop_after=20, max=4 * limit,
                     report="ratelimit")

    codes = sum((Counter(r["codes"]) for r in results), Counter())
    per_worker = [r["codes"].get("VALID", 0) for r in results]
    assert codes["VALID"] == limit, (codes, per_worker)
    assert set(codes) == {"VALID", "RATE_LIMITED"}, codes
    assert sum(1 for count in per_worker if count) >= 2, f"the workers did not race: {per_worker}"
    left = [remaining for r in results for remaining in r["left"]]
    assert sorted(left) == list(range(limit))  # each slot of the window handed out exactly once

    # The parent, a fifth process, sees the same window full; two windows later it is empty.
    verifier = core.Verifier(store)
    assert verifier.verify(plaintext, now).code == "RATE_LIMITED"
    later = verifier.verify(plaintext, now + 2 * HOUR)
    assert later.code == "VALID"
    assert later.ratelimits[0].remaining == limit - 1


def test_disable_enable_and_delete_are_seen_at_once_by_every_worker(manage: Management, start_workers):
    api = manage.create_api("mp")
    key, plaintext = manage.create_key(KeySpec(api_id=api.id))
    workers = start_workers(WORKERS)

    def everyone_verifies() -> list[dict[str, Any]]:
        for worker in workers:
            worker.send(op="verify", key=plaintext, now_ms=now_ms())
        return [worker.recv() for worker in workers]

    def assert_cached_and_valid() -> None:
        # Twice: the first may load the record, the second must come from the worker's cache,
        # so the change below has a cached record to invalidate in every worker.
        for answer in everyone_verifies():
            assert answer["code"] == "VALID" and answer["key_id"] == key.id
        for answer in everyone_verifies():
            assert answer == {"code": "VALID", "cache_hit": True, "key_id": key.id}

    assert_cached_and_valid()
    # Each change is made, and has returned, before any worker is told to verify again: the
    # very next verification of each must see it.
    manage.update_key(key.id, enabled=False)
    assert [a["code"] for a in everyone_verifies()] == ["DISABLED"] * WORKERS

    manage.update_key(key.id, enabled=True)
    assert [a["code"] for a in everyone_verifies()] == ["VALID"] * WORKERS
    assert_cached_and_valid()

    manage.delete_key(key.id)
    assert [a["code"] for a in everyone_verifies()] == ["NOT_FOUND"] * WORKERS
    assert [a["code"] for a in everyone_verifies()] == ["NOT_FOUND"] * WORKERS


def test_a_verifier_created_during_a_commit_still_sees_that_change(manage: Management, start_workers):
    api = manage.create_api("mp")
    key, plaintext = manage.create_key(KeySpec(api_id=api.id))
    writer, late = start_workers(2)
    assert writer.ask(op="disable_paused_before_commit", key_id=key.id) == {"paused": "before commit"}
    assert late.ask(op="renew") == {"renewed": True}  # a worker (re)starting its verifier now
    assert late.ask(op="verify", key=plaintext, now_ms=now_ms())["code"] == "VALID"  # not committed yet: right
    writer.send(op="go")  # any line ends the pause
    assert writer.recv() == {"committed": True}
    assert manage.get_key(key.id).enabled is False
    assert late.ask(op="verify", key=plaintext, now_ms=now_ms())["code"] == "DISABLED"
