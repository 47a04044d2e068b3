"""SIGKILL of a process while it writes: nothing it was told was done is lost, at most the one
charge whose answer died with it is extra, and the store opens and takes writes afterwards.

The killed processes are fresh interpreters running the script below (written to tmp_path);
they open the store themselves. Each line they print is one write(2) of a few bytes to a pipe,
so a line is either in the pipe whole or not at all, and it is written only after the
operation it reports has returned. A reader thread drains the pipe, so nothing can block.

LMDB keeps its writer mutex in the environment's lock file. When no process has the
environment open, the next one to open it re-initialises that file, which hides any stale
lock; so a "holder" process keeps both environments open across the kills, and the next
writer has to take over the dead owner's (robust) mutex itself.

- a writer creating keys and charging credits is killed at a random moment, three times over
  one data dir: every key it reported is there and verifies, the balance holds every reported
  charge and at most one more, and the store opens and takes writes after each kill;
- a process killed while holding both environments' writer locks: nothing it had not committed
  is visible, and the next writes (here, and in a new process) go through;
- a writer killed between raising the change hint and committing must not hide the next change
  from a verifier created after the crash.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from keysvc._fast import _core_c, _core_py
from keysvc.management import CreditsSpec, KeySpec, Management, now_ms
from keysvc.store import LmdbStore, StoreConfig

pytestmark = pytest.mark.slow

START_TIMEOUT = 60.0  # interpreter start and imports; generous for a loaded 2-core machine
STEP_TIMEOUT = 60.0  # only turns a hang (a stale lock, a dead pipe) into a failure
ROUNDS = 3
INITIAL_CREDITS = 10**6
KEY_CREDITS = 5  # of each key the writer creates

T = TypeVar("T")

SCRIPT = r'''
import json, os, random, sys, time

cfg = json.loads(sys.argv[1])
import keysvc._fast as fast
from keysvc.management import CreditsSpec, KeySpec, Management, now_ms
from keysvc.store import LmdbStore, StoreConfig

if fast.COMPILED is not cfg["compiled"]:
    sys.exit(f"wrong twin: keysvc._fast.COMPILED is {fast.COMPILED}, expected {cfg['compiled']}")
store = LmdbStore(StoreConfig(data_dir=cfg["data_dir"], map_size=cfg["map_size"],
                              counters_map_size=cfg["counters_map_size"]))
manage = Management(store)
verifier = fast.Verifier(store)


def say(obj):
    # One write(2) of less than PIPE_BUF bytes: the line reaches the pipe whole or not at all.
    os.write(1, (json.dumps(obj) + "\n").encode())


def wait_to_be_killed():
    say({"holding": os.getpid()})
    time.sleep(600)
    sys.exit("not killed")


mode = cfg["mode"]
say({"ready": os.getpid(), "compiled": fast.COMPILED})

if mode == "writer":
    # Create keys (one synced counters write for the balance, one synced store write for the
    # key) and charge the shared credit key (one counters write) in between, until killed.
    # Each is reported only after it returned.
    rng = random.Random()
    while True:
        key, plaintext = manage.create_key(
            KeySpec(api_id=cfg["api_id"], credits=CreditsSpec(remaining=cfg["key_credits"])))
        say({"key": key.id, "plaintext": plaintext})
        for _ in range(rng.randint(1, 20)):
            res = verifier.verify(cfg["credit_key"], now_ms())
            if not res.valid:
                say({"error": res.code})
                sys.exit(3)
            say({"charged": res.credits})

elif mode == "hold_write_locks":
    # Charge once (committed), then open a write transaction in each environment, change
    # something in each, and die holding both writer locks.
    res = verifier.verify(cfg["credit_key"], now_ms())
    say({"charged": res.credits, "code": res.code})
    counters = store.counters_env.begin(write=True)
    counters.put(b"c\x00" + cfg["credit_key_id"].encode(), bytes(16), db=store.counters_db)  # balance 0, uncommitted
    records = store.write()
    w = records.__enter__()
    key = w.key(cfg["credit_key_id"])
    key.enabled = False  # never committed
    w.put_key(key)
    wait_to_be_killed()

elif mode == "die_before_commit":
    # Management.update_key as it is, killed between the change log (and hint) being written
    # and the commit: where every write spends its fsync.
    from keysvc.store.lmdb import WriteTxn

    log_changes = WriteTxn.log_changes

    def log_then_die(self):
        log_changes(self)
        wait_to_be_killed()

    WriteTxn.log_changes = log_then_die
    manage.update_key(cfg["key_id"], enabled=False)
    sys.exit("the update returned")

elif mode == "serve":
    # Stays up (keeping both environments open) and answers commands, one JSON line each.
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "verify":
            hits = verifier.hits
            res = verifier.verify(cmd["key"], now_ms())
            say({"code": res.code, "cache_hit": verifier.hits > hits, "credits": res.credits})
        elif cmd["op"] == "create":
            key, plaintext = manage.create_key(
                KeySpec(api_id=cmd["api_id"], credits=CreditsSpec(remaining=cfg["key_credits"])))
            res = verifier.verify(plaintext, now_ms())
            say({"code": res.code, "credits": res.credits})
        elif cmd["op"] == "exit":
            break
    store.close()
'''


def within(seconds: float, fn: Callable[[], T]) -> T:
    """fn() in a thread, failing the test if it has not returned in time (a stale LMDB lock
    blocks forever in C: the stuck daemon thread is abandoned, the test fails)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {seconds}s: a stale lock?")
    if "error" in box:
        raise box["error"]
    return box["result"]


class Child:
    """A fresh interpreter running SCRIPT; a thread drains its stdout into a queue."""

    def __init__(self, script: Path, cfg: dict[str, Any], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._stderr = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, env=env,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.torn = 0  # a last line without its newline (never expected: each line is one write)
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        hello = self.recv(START_TIMEOUT)
        assert hello == {"ready": self.pid, "compiled": cfg["compiled"]}, hello

    def _pump(self) -> None:
        for raw in self.proc.stdout:
            if raw.endswith(b"\n"):
                self._lines.put(json.loads(raw))
            else:
                self.torn += 1
        self._lines.put(None)

    def recv(self, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"child {self.pid} said nothing within {timeout}s")
        if line is None:
            self.proc.wait(timeout=10)
            pytest.fail(f"child {self.pid} exited with {self.proc.returncode}: {self.log.read_text()}")
        return line

    def ask(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return self.recv()

    def kill(self) -> list[dict[str, Any]]:
        """SIGKILL, reap, and return every line it wrote that the parent had not read yet."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=STEP_TIMEOUT)
        assert self.proc.returncode == -signal.SIGKILL, (self.proc.returncode, self.log.read_text())
        self._pump_thread.join(STEP_TIMEOUT)  # the pipe's end of file: all its lines are queued
        assert not self._pump_thread.is_alive()
        lines = []
        while (line := self._lines.get_nowait()) is not None:
            lines.append(line)
        return lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()


@pytest.fixture
def spawn(tmp_path: Path, data_dir: Path, twin) -> Iterator[Callable[..., Child]]:
    """spawn(mode, **cfg) -> a ready child on the test's data dir; all stopped at teardown."""
    env, compiled = twin
    script = tmp_path / "child.py"
    script.write_text(SCRIPT)
    children: list[Child] = []

    def start(mode: str, **cfg: Any) -> Child:
        full = {
            "mode": mode, "data_dir": str(data_dir), "compiled": compiled, "map_size": 1 << 30,
            "counters_map_size": 1 << 28, "key_credits": KEY_CREDITS, **cfg,
        }
        child = Child(script, full, env, tmp_path / f"child{len(children)}-{mode}.log")
        children.append(child)
        return child

    yield start
    for child in children:
        child.stop()


def _config(data_dir: Path) -> StoreConfig:
    return StoreConfig(data_dir=str(data_dir), map_size=1 << 30, counters_map_size=1 << 28)


def test_sigkill_of_a_writer_loses_nothing_it_reported(data_dir: Path, spawn, twin):
    core = _core_c if twin[1] else _core_py  # the parent checks with the children's twin

    def setup() -> tuple[Any, Any, str]:
        store = LmdbStore(_config(data_dir))
        try:
            manage = Management(store)
            api = manage.create_api("crash")
            credit_key, plaintext = manage.create_key(
                KeySpec(api_id=api.id, credits=CreditsSpec(remaining=INITIAL_CREDITS)))
            return api, credit_key, plaintext
        finally:
            store.close()

    api, credit_key, credit_plaintext = within(STEP_TIMEOUT, setup)
    holder = spawn("serve")  # keeps both environments (and their lock files' state) open throughout
    expected = INITIAL_CREDITS  # the exact balance before each round
    earlier_keys: list[str] = []
    rng = random.Random()

    for round_ in range(ROUNDS):
        writer = spawn("writer", api_id=api.id, credit_key=credit_plaintext)
        time.sleep(rng.uniform(0.3, 1.5))  # the pump thread keeps reading meanwhile
        lines = writer.kill()
        assert writer.torn == 0
        assert not [line for line in lines if "error" in line], lines
        keys = [(line["key"], line["plaintext"]) for line in lines if "key" in line]
        charges = [line["charged"] for line in lines if "charged" in line]
        assert keys and charges, f"round {round_}: the writer did nothing before the kill: {lines}"
        # What each charge reported: the balance went down by one each time, from `expected`.
        assert charges == list(range(expected - 1, expected - 1 - len(charges), -1))

        def check() -> int:
            store = LmdbStore(_config(data_dir))  # opens: no stale lock, no unreadable file
            try:
                manage = Management(store)
                verifier = core.Verifier(store)
                balance = manage.credits(manage.get_key(credit_key.id))
                for key_id, plaintext in keys:
                    res = verifier.verify(plaintext, now_ms())
                    assert (res.code, res.key.key_id, res.credits) == ("VALID", key_id, KEY_CREDITS - 1)
                for key_id in earlier_keys:
                    assert manage.get_key(key_id).id == key_id
                # Fresh writes in both environments, each through the writer lock the child may
                # have died holding.
                fresh, fresh_plaintext = manage.create_key(KeySpec(api_id=api.id, credits=CreditsSpec(remaining=2)))
                res = verifier.verify(fresh_plaintext, now_ms())
                assert (res.code, res.key.key_id, res.credits) == ("VALID", fresh.id, 1)
                res = verifier.verify(credit_plaintext, now_ms())
                assert (res.code, res.credits) == ("VALID", balance - 1)
                return balance
            finally:
                store.close()

        balance = within(STEP_TIMEOUT, check)
        # Every reported charge is in the balance, plus at most the one whose report was lost.
        assert balance in (expected - len(charges), expected - len(charges) - 1), (expected, len(charges), balance)
        expected = balance - 1  # the parent's own charge in check()
        earlier_keys.extend(key_id for key_id, _ in keys)

    # The holder, open since before the first kill, still verifies and writes.
    assert holder.ask(op="verify", key=credit_plaintext) == {"code": "VALID", "cache_hit": False,
                                                             "credits": expected - 1}
    assert holder.ask(op="create", api_id=api.id) == {"code": "VALID", "credits": KEY_CREDITS - 1}


def test_a_writer_killed_holding_both_writer_locks(store: LmdbStore, manage: Management, spawn, twin):
    core = _core_c if twin[1] else _core_py
    api = manage.create_api("crash")
    key, plaintext = manage.create_key(KeySpec(api_id=api.id, credits=CreditsSpec(remaining=100)))

    child = spawn("hold_write_locks", credit_key=plaintext, credit_key_id=key.id)
    assert child.recv() == {"charged": 99, "code": "VALID"}
    assert child.recv() == {"holding": child.pid}
    child.kill()

    # This process has had both environments open all along, so their lock files were not
    # re-initialised: each next write must take over the dead process's writer mutex.
    def after() -> None:
        verifier = core.Verifier(store)
        res = verifier.verify(plaintext, now_ms())  # a counters write: the uncommitted 0 never landed
        assert (res.code, res.credits) == ("VALID", 98)
        assert manage.get_key(key.id).enabled is True  # the uncommitted disable never landed
        manage.update_key(key.id, name="after the crash")  # a store write
        assert manage.get_key(key.id).name == "after the crash"
        fresh, fresh_plaintext = manage.create_key(KeySpec(api_id=api.id))
        res = verifier.verify(fresh_plaintext, now_ms())
        assert (res.code, res.key.key_id) == ("VALID", fresh.id)

    within(STEP_TIMEOUT, after)
    # And a process started after the crash opens the store and writes.
    server = spawn("serve")
    assert server.ask(op="verify", key=plaintext) == {"code": "VALID", "cache_hit": False, "credits": 97}
    assert server.ask(op="create", api_id=api.id) == {"code": "VALID", "credits": KEY_CREDITS - 1}


def test_a_writer_killed_before_its_commit_hides_no_later_change(manage: Management, spawn):
    api = manage.create_api("crash")
    key, plaintext = manage.create_key(KeySpec(api_id=api.id))
    other, _ = manage.create_key(KeySpec(api_id=api.id))

    doomed = spawn("die_before_commit", key_id=other.id)  # its change to `other` never commits
    assert doomed.recv() == {"holding": doomed.pid}
    doomed.kill()
    assert manage.get_key(other.id).enabled is True

    worker = spawn("serve")  # a worker started after the crash
    assert worker.ask(op="verify", key=plaintext)["code"] == "VALID"
    assert worker.ask(op="verify", key=plaintext) == {"code": "VALID", "cache_hit": True, "credits": None}
    manage.update_key(key.id, enabled=False)
    assert worker.ask(op="verify", key=plaintext)["code"] == "DISABLED"
