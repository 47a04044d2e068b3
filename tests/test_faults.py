"""Faults of the node's disk, its LMDB maps and its spool, against real `keysvc serve` processes
(and a real flusher) on real file systems.

- A full disk (the data dir on a small tmpfs, filled with ballast, then with keys): createKey
  gets a clear 503 envelope naming the full disk, never a 500, a dropped connection or a hang;
  no worker dies (a writemap page the disk cannot back is a SIGBUS); keys committed before
  verify on, credits charged exactly; new ratelimit windows are refused the same clear way.
  With room made and the server restarted, everything committed is there, and every event is
  in ClickHouse or counted as dropped.
- The same, in one process, below the HTTP layer: the counters and the spool growing on a full
  disk raise StoreFullError / count dropped events, and the process lives.
- Full LMDB maps (small storage.map_size, storage.counters_map_size, analytics.spool_map_size):
  clear 503s naming the setting to raise; verifications answer on while the spool refuses
  events (counted as dropped); the full spool drains once ClickHouse is there; nothing
  committed is lost.
- A read-only data dir (a tmpfs remounted read-only): `keysvc serve` and `keysvc root-key
  create` refuse to start with one line naming the dir and the cause, not a traceback.
- Corrupted spool records (garbage, a truncated event, an event of the wrong shape, keys that are
  no sequence number), among good ones: the flusher skips, counts and logs them, stays up, and
  lands every good event exactly once.

Mounting needs root (CI runs as root); without it these tests skip, saying why.
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from keysvc.analytics import events
from keysvc.analytics.client import AnalyticsUnavailable, run_query
from keysvc.analytics.spool import Spool
from server import Server, can_mount, free_port, remount, tmpfs, wait_until

pytestmark = pytest.mark.slow

LIVENESS = 30.0  # seconds: only turns a hang into a failure, never a speed check
MiB = 1 << 20
META_PAD = "x" * 2000  # a createKey this big fills a store fast


@pytest.fixture(scope="module")
def mountable() -> None:
    reason = can_mount()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def disk(tmp_path: Path, mountable: None) -> Iterator[Callable[[str], Path]]:
    """disk(size) -> the mount point of a fresh tmpfs of that size; unmounted at teardown (the
    test stops its servers first, in its own finally)."""
    mounts = []

    def mount(size: str) -> Path:
        stack = tmpfs(tmp_path / f"disk{len(mounts)}", size)
        path = stack.__enter__()
        mounts.append(stack)
        return path

    try:
        yield mount
    finally:
        for stack in reversed(mounts):
            stack.__exit__(None, None, None)


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    """A YAML config; no metrics listener (its fixed port would clash between servers)."""
    sections["metrics"] = {"port": None, **sections.get("metrics", {})}
    path.write_text(yaml.safe_dump(sections))
    return path


def post(server: Server, path: str, body: Any) -> tuple[int | None, Any]:
    """(status, decoded body); (None, the error) when no answer came (a worker died, a hang)."""
    try:
        status, _, payload = server.request("POST", path, body)
    except OSError as exc:
        return None, repr(exc)
    return status, json.loads(payload)


def call(server: Server, path: str, body: Any) -> Any:
    status, payload = post(server, path, body)
    assert status == 200, (path, status, payload)
    return payload["data"]


def assert_clear_refusal(status: int | None, payload: Any, *words: str) -> None:
    """A 503 in the error envelope whose detail names the cause; not a 500, a reset or a hang."""
    assert status == 503, (status, payload)
    error = payload["error"]
    assert error["status"] == 503 and payload["meta"]["requestId"].startswith("req_"), payload
    assert "Traceback" not in error["detail"]
    for word in words:
        assert word in error["detail"], error["detail"]


def fill_with_keys(server: Server, api_id: str, *words: str, limit: int = 20_000) -> list[tuple[str, str]]:
    """createKey (with credits, and a big meta) until it is refused, then a few more times: each
    is created or refused clearly. Returns the keys created."""
    created: list[tuple[str, str]] = []
    refused = 0
    for _ in range(limit):
        status, payload = post(server, "/v2/keys.createKey", {
            "apiId": api_id, "credits": {"remaining": 10}, "meta": {"pad": META_PAD}})
        if status == 200:
            created.append((payload["data"]["keyId"], payload["data"]["key"]))
            continue
        assert_clear_refusal(status, payload, *words)
        refused += 1
        if refused == 5:  # whichever worker answers: a smaller write may still fit, none hangs
            assert created, "refused from the first key on: the test left no room"
            return created
    pytest.fail(f"{limit} keys were created and few were refused: is the store really this small?")


def top_up(path: Path) -> None:
    """Append to `path` until its file system has not a block left."""
    with open(path, "ab", buffering=0) as out:
        try:
            while True:
                out.write(b"\xa5" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def ballast(mount: Path, leave: int) -> Path:
    """A file filling the file system at `mount` but for about `leave` bytes, or all of it: the
    server writes meanwhile (its spool's disk reserve, chDB's merges), and a disk that fills up
    before the ballast is whole is full as wanted."""
    stat = os.statvfs(mount)
    size = stat.f_bavail * stat.f_frsize - leave
    path = mount / "ballast"
    with open(path, "wb", buffering=0) as out:  # unbuffered: nothing left to fail again at close
        chunk = b"\xa5" * MiB
        while size > 0:
            try:
                size -= out.write(chunk[:min(size, len(chunk))])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return path


class Traffic:
    """Keys made before a fault (some with credits, some without) and what was done with them:
    every answered verification and ratelimit decision (each spools one event)."""

    def __init__(self, server: Server, api_id: str, credited: int = 10, plain: int = 5) -> None:
        self.api_id = api_id
        self.keys: list[tuple[str, str, int | None]] = []  # id, plaintext, credits left (None: none)
        self.events = 0
        for i in range(credited + plain):
            body: dict[str, Any] = {"apiId": api_id}
            if i < credited:
                body["credits"] = {"remaining": 1000}
            data = call(server, "/v2/keys.createKey", body)
            self.keys.append((data["keyId"], data["key"], 1000 if i < credited else None))
        self.check(server)

    def verify(self, server: Server, plaintext: str, tags: list[str] | None = None) -> tuple[int | None, Any]:
        status, payload = post(server, "/v2/keys.verifyKey", {"key": plaintext, **({"tags": tags} if tags else {})})
        if status == 200:
            self.events += 1
        return status, payload

    def check(self, server: Server, *refusal: str) -> int:
        """Verify every key: VALID, with its balance one lower. With `refusal` words, a key with
        credits may instead be refused clearly (its charge could not be written). Returns how
        many were refused."""
        refused = 0
        for n, (key_id, plaintext, credits) in enumerate(self.keys):
            status, payload = self.verify(server, plaintext)
            if refusal and credits is not None and status != 200:
                assert_clear_refusal(status, payload, *refusal)
                refused += 1
                continue
            assert status == 200, (status, payload)
            data = payload["data"]
            expected = None if credits is None else credits - 1
            assert (data["code"], data["keyId"], data.get("credits")) == ("VALID", key_id, expected), data
            self.keys[n] = (key_id, plaintext, expected)
        return refused

    def verify_created(self, server: Server, created: list[tuple[str, str]], credits: int) -> None:
        for key_id, plaintext in created:
            status, payload = self.verify(server, plaintext)
            assert status == 200, (status, payload)
            data = payload["data"]
            assert (data["code"], data["keyId"], data["credits"]) == ("VALID", key_id, credits), data

    def balances(self, server: Server) -> None:
        """The balances as getKey shows them (no charge) are exactly what the answers said."""
        for key_id, _, credits in self.keys:
            data = call(server, "/v2/keys.getKey", {"keyId": key_id})
            assert (data.get("credits") or {}).get("remaining") == credits, (key_id, data)

    def new_windows(self, server: Server, *refusal: str, limit: int = 5000) -> int:
        """ratelimit.multiLimit with 100 new identifiers a call (each a new counters entry)
        until refused: each answer is a 200 or the clear refusal. Returns how many passed."""
        namespace = f"ns-{uuid.uuid4().hex[:8]}"
        for n in range(limit):
            items = [{"namespace": namespace, "identifier": f"{n}-{i}-" + "i" * 180, "limit": 10,
                      "duration": 60_000} for i in range(100)]
            status, payload = post(server, "/v2/ratelimit.multiLimit", items)
            if status != 200:
                assert_clear_refusal(status, payload, *refusal)
                return n
            assert payload["data"]["passed"] is True, payload
            self.events += 100
        pytest.fail(f"{limit} x 100 new ratelimit windows fit: is the counters map really this small?")


def all_workers(server: Server, count: int = 2) -> list[int]:
    """The worker pids once all `count` have started (serve answers as soon as one has)."""
    return sorted(wait_until(lambda: len(server.worker_pids()) == count and server.worker_pids(), LIVENESS,
                             f"{count} workers"))


def analytics_ready(server: Server) -> None:
    """Until the flusher answers queries: chDB open, its schema migrated (before a test fills
    the disk, so that what fails later is the inserts, not the migration)."""
    wait_until(lambda: post(server, "/v2/analytics.getVerifications", {"query": "SELECT 1 AS one"})[0] == 200,
               LIVENESS, "the flusher to answer queries", interval=0.2)


def spool_state(data_dir: Path, map_size: int = 2 << 30) -> tuple[int, bool, int]:
    """(events spooled, a batch in flight, events dropped so far); `map_size` as the server's."""
    spool = Spool(str(data_dir), map_size)
    try:
        return spool.depth(), spool.inflight() is not None, spool.dropped()
    finally:
        spool.close()


def assert_every_event_landed_or_counted(server: Server, data_dir: Path, traffic: Traffic,
                                        map_size: int = 2 << 30) -> None:
    """Once the spool is drained: the rows in ClickHouse (through the query API) and the events
    counted as dropped are, together, every event the traffic made."""
    def counts() -> tuple[int, int] | None:
        if spool_state(data_dir, map_size)[:2] != (0, False):
            return None
        answers = [post(server, f"/v2/analytics.get{table}", {"query": f"SELECT count() AS n FROM {view}"})
                   for table, view in (("Verifications", "key_verifications_v1"), ("Ratelimits", "ratelimits_v1"))]
        if any(status == 503 for status, _ in answers):  # the flusher is still starting
            return None
        assert all(status == 200 for status, _ in answers), answers
        return answers[0][1]["data"][0]["n"], answers[1][1]["data"][0]["n"]

    verifications, ratelimits = wait_until(counts, LIVENESS, "the flusher to drain the spool", interval=0.2)
    dropped = spool_state(data_dir, map_size)[2]
    assert verifications + ratelimits + dropped == traffic.events, (verifications, ratelimits, dropped, traffic.events)


# -- a full disk ---------------------------------------------------------------------------------------


def test_a_full_disk_is_a_clear_error_and_loses_nothing(tmp_path: Path, disk):
    data_dir = disk("48m")  # the server's log goes next to it, off the small disk
    # Maps far larger than the disk (their files are sparse): the disk fills first.
    config = write_config(tmp_path / "keysvc.yaml",
                          storage={"map_size": 1 << 30, "counters_map_size": 1 << 30},
                          analytics={"flush_interval": 0.2, "drain_timeout": 1.0, "spool_map_size": 2 << 30})
    server = Server(data_dir, workers=2, extra=("--config", str(config)))
    try:
        api_id = call(server, "/v2/apis.createApi", {"name": "full-disk"})["apiId"]
        traffic = Traffic(server, api_id)
        workers = all_workers(server)
        analytics_ready(server)
        weight = ballast(data_dir, leave=2 * MiB)

        created = fill_with_keys(server, api_id, "disk", "full")
        # Verification goes on: balances charged (counters writes) and events offered to a spool
        # that cannot grow, on a full disk.
        for _ in range(3):
            traffic.check(server)
        traffic.verify_created(server, created, 9)
        traffic.balances(server)
        # New ratelimit windows grow the counters until the disk says no, clearly; then keys
        # without credits still verify, and keys with credits verify or are refused clearly.
        traffic.new_windows(server, "disk", "full")
        traffic.check(server, "disk", "full")
        assert sorted(server.worker_pids()) == workers, f"a worker died:\n{server.log()[-3000:]}"

        # The operator makes room: writes go through again, without a restart.
        weight.unlink()
        fresh = wait_until(lambda: post(server, "/v2/keys.createKey", {"apiId": api_id})[0] == 200, LIVENESS,
                           "createKey to work again once the disk has room")
        assert fresh
        traffic.check(server)
        traffic.balances(server)
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    log = server.log()
    assert "Traceback" not in log and "uncaught exception" not in log, \
        [line[:2000] for line in log.splitlines() if "Traceback" in line or "uncaught exception" in line][:3]

    server = Server(data_dir, workers=2, extra=("--config", str(config)))
    try:
        assert_every_event_landed_or_counted(server, data_dir, traffic)
        traffic.balances(server)
        traffic.check(server)
        traffic.verify_created(server, created, 8)
        fresh = call(server, "/v2/keys.createKey", {"apiId": api_id})
        assert call(server, "/v2/keys.verifyKey", {"key": fresh["key"]})["valid"] is True
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_a_flusher_started_on_a_full_disk_waits_for_room(tmp_path: Path, disk):
    data_dir = disk("32m")
    config = write_config(tmp_path / "keysvc.yaml", analytics={"flush_interval": 0.2, "drain_timeout": 1.0})
    server = Server(data_dir, workers=1, extra=("--config", str(config)))
    try:
        api_id = call(server, "/v2/apis.createApi", {"name": "full-disk-flusher"})["apiId"]
        traffic = Traffic(server, api_id, credited=2, plain=2)
        analytics_ready(server)
        (flusher,) = server.flusher_pids()
        weight = ballast(data_dir, leave=0)
        # The lock file without a block, as on a first start, and not a block to give it.
        os.truncate(data_dir / "analytics.lock", 0)
        top_up(weight)
        os.kill(flusher, signal.SIGKILL)
        (flusher,) = wait_until(lambda: [pid for pid in server.flusher_pids() if pid != flusher], LIVENESS,
                                "a new flusher")
        traffic.check(server)  # verification goes on meanwhile (its events are dropped, and counted)
        time.sleep(3)  # the flusher's start: imports, its lock, the spool, chDB (which cannot reserve room)
        assert server.flusher_pids() == [flusher], f"the flusher died on the full disk:\n{server.log()[-3000:]}"
        weight.unlink()  # room again: the same flusher lands what it can
        traffic.check(server)
        assert_every_event_landed_or_counted(server, data_dir, traffic)
        assert server.flusher_pids() == [flusher]
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    log = server.log()
    assert "Traceback" not in log and "uncaught exception" not in log, \
        [line[:2000] for line in log.splitlines() if "Traceback" in line or "uncaught exception" in line][:3]


def start_flusher(data_dir: Path, config: Path, log_path: Path) -> subprocess.Popen:
    """`python -m keysvc.analytics` on its own (as `keysvc serve` runs it), its output to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "keysvc.analytics", "--config", str(config), "--data-dir",
                                 str(data_dir)], stdout=log, stderr=subprocess.STDOUT)


def stop_flusher(flusher: subprocess.Popen) -> int:
    if flusher.poll() is None:
        flusher.send_signal(signal.SIGTERM)
        try:
            flusher.wait(30)
        except subprocess.TimeoutExpired:
            flusher.kill()
            flusher.wait()
    return flusher.returncode


def query_rows(data_dir: Path, sql: str) -> list[dict[str, Any]] | None:
    """The rows, through the flusher's socket; None while it cannot answer."""
    try:
        return asyncio.run(run_query(str(data_dir), sql, 10))
    except AnalyticsUnavailable:
        return None


def test_a_schema_migration_on_a_full_disk_leaves_chdb_usable(tmp_path: Path, disk):
    """The flusher's first start (chDB created, its schema migrated) on a disk with no room:
    it waits, without dying; once there is room its events land; and the next flusher can
    open the same chDB (an interrupted CREATE must not leave a catalog it cannot read)."""
    data_dir = disk("32m")
    # Metrics off: this is about chDB (test_a_flusher_started_on_a_full_disk_waits_for_room has them on).
    config = write_config(tmp_path / "keysvc.yaml", analytics={"flush_interval": 0.2, "drain_timeout": 5.0},
                          metrics={"enabled": False})
    first = [f"req_first{i:04d}" for i in range(50)]
    later = [f"req_later{i:04d}" for i in range(50)]
    spool = Spool(str(data_dir), 1 << 30)
    try:
        assert spool.append([verification(rid) for rid in first])
    finally:
        spool.close()
    (data_dir / "analytics.lock").write_text("0\n")  # as a flusher that ran before chDB existed left it
    weight = ballast(data_dir, leave=0)
    top_up(weight)
    log_path = tmp_path / "flusher.log"
    flusher = start_flusher(data_dir, config, log_path)
    try:
        time.sleep(4)  # its start: imports, its lock, the spool, chDB and a migration that cannot write
        assert flusher.poll() is None, f"the flusher died on the full disk ({flusher.returncode}):\n" \
                                       f"{log_path.read_text()[-3000:]}"
        weight.unlink()
        wait_until(lambda: (query_rows(data_dir, "SELECT count() AS n FROM key_verifications_v1") or [{}])[0]
                   .get("n") == len(first), LIVENESS, "the first events to land once there is room", interval=0.2)
    finally:
        assert stop_flusher(flusher) == 0, log_path.read_text()[-3000:]

    spool = Spool(str(data_dir), 1 << 30)
    try:
        assert spool.append([verification(rid) for rid in later])
    finally:
        spool.close()
    flusher = start_flusher(data_dir, config, log_path)
    try:
        wait_until(lambda: (query_rows(data_dir, "SELECT count() AS n FROM key_verifications_v1") or [{}])[0]
                   .get("n") == len(first) + len(later), LIVENESS, "the next flusher to open chDB and land events",
                   interval=0.2)
        rows = query_rows(data_dir, "SELECT request_id FROM key_verifications_v1")
        assert sorted(row["request_id"] for row in rows) == sorted(first + later)
    finally:
        assert stop_flusher(flusher) == 0, log_path.read_text()[-3000:]


FULL_DISK_CHILD = r'''
import json, os, sys
from keysvc._fast import Verifier
from keysvc.analytics.spool import Spool
from keysvc.management import CreditsSpec, KeySpec, Management, now_ms
from keysvc.store import LmdbStore, StoreConfig, StoreFullError

data_dir = sys.argv[1]
config = StoreConfig(data_dir=data_dir, map_size=1 << 30, counters_map_size=1 << 30)
store = LmdbStore(config)
manage = Management(store)
api = manage.create_api("full")
keys = [manage.create_key(KeySpec(api_id=api.id, credits=CreditsSpec(remaining=100)))[1] for _ in range(20)]
spool = Spool(data_dir, 1 << 30)
stat = os.statvfs(data_dir)
with open(os.path.join(data_dir, "ballast"), "wb") as out:  # the disk is full from here on
    out.write(b"\xa5" * (stat.f_bavail * stat.f_frsize))
report = {}
verifier = Verifier(store)
report["charged"] = [verifier.verify(key, now_ms()).code for key in keys for _ in range(5)].count("VALID")
# The counters grow by new balances until the disk refuses.
grown = 0
try:
    for i in range(100_000):
        store.set_credits_many([(f"key_new_{i}_{j}", 5, 0) for j in range(500)])
        grown += 500
    report["counters"] = "never full"
except StoreFullError as exc:
    report["counters"] = str(exc)
report["grown"] = grown
# The spool grows until the disk refuses: appends say so, and count what they dropped.
appended = 0
for _ in range(100_000):
    if not spool.append([b"\x93" + b"e" * 300] * 20):
        break
    appended += 20
report["appended"], report["dropped"] = appended, spool.dropped()
# Existing keys still verify (their charges reuse freed pages) or are refused clearly.
codes = []
for key in keys:
    try:
        codes.append(verifier.verify(key, now_ms()).code)
    except StoreFullError as exc:
        codes.append(str(exc))
report["codes"] = codes
print(json.dumps(report), flush=True)
'''


def test_the_counters_and_the_spool_on_a_full_disk_fail_clearly_in_process(tmp_path: Path, disk):
    """In a child process (a SIGBUS would kill it, not pytest): growth of the writemap counters
    on a full disk is a StoreFullError, the spool's refused appends are counted, and charges of
    existing keys go on."""
    data_dir = disk("24m")
    script = tmp_path / "full_disk_child.py"
    script.write_text(FULL_DISK_CHILD)
    result = subprocess.run([sys.executable, str(script), str(data_dir)], capture_output=True, text=True,
                            timeout=LIVENESS)
    assert result.returncode != -signal.SIGBUS, f"killed by SIGBUS: a writemap page the full disk could not back"
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["charged"] == 100
    assert "disk" in report["counters"] and "full" in report["counters"], report
    assert report["grown"] > 0, report  # the reserve allocated before the disk filled was used
    assert report["dropped"] > 0 and "refused" in result.stderr, (report, result.stderr[-2000:])
    assert all(code == "VALID" or ("disk" in code and "full" in code) for code in report["codes"]), report


# -- full LMDB maps ----------------------------------------------------------------------------------------


def test_full_store_and_spool_maps_are_clear_errors_and_lose_nothing(tmp_path: Path):
    data_dir = tmp_path / "data"
    small = {"map_size": 1 * MiB}
    spool_small = {"spool_map_size": 1 * MiB, "spool_cap_bytes": 1 * MiB - 1, "flush_interval": 0.2,
                   "drain_timeout": 1.0}
    # No ClickHouse at first: the events stay spooled, until the spool's map is full.
    nowhere = write_config(tmp_path / "nowhere.yaml", storage=small,
                           analytics={**spool_small, "clickhouse_url": f"http://127.0.0.1:{free_port()}"})
    embedded = write_config(tmp_path / "embedded.yaml", storage=small, analytics=spool_small)
    server = Server(data_dir, workers=2, extra=("--config", str(nowhere)))
    try:
        api_id = call(server, "/v2/apis.createApi", {"name": "full-maps"})["apiId"]
        traffic = Traffic(server, api_id)
        workers = all_workers(server)

        created = fill_with_keys(server, api_id, "map size is used up", "storage.map_size")
        traffic.check(server)
        traffic.verify_created(server, created, 9)

        # The spool's map fills (events with 10 KiB of tags): verifications answer on, and the
        # events they could not spool are counted as dropped.
        plain = [plaintext for _, plaintext, credits in traffic.keys if credits is None]
        tags = [f"{i}-" + "t" * 500 for i in range(20)]
        for n in range(2000):
            if n % 20 == 0 and spool_state(data_dir, MiB)[2] > 0:
                break
            status, payload = traffic.verify(server, plain[n % len(plain)], tags)
            assert status == 200 and payload["data"]["code"] == "VALID", (status, payload)
        else:
            pytest.fail("the spool's map never filled, or its refusals were not counted")
        assert "the event spool refused" in server.log()
        traffic.check(server)
        traffic.balances(server)
        assert sorted(server.worker_pids()) == workers, f"a worker died:\n{server.log()[-3000:]}"
    finally:
        assert server.stop() == 0, server.log()[-3000:]

    server = Server(data_dir, workers=2, extra=("--config", str(embedded)))
    try:
        # The full spool drains into the embedded ClickHouse; nothing committed was lost.
        assert_every_event_landed_or_counted(server, data_dir, traffic, MiB)
        traffic.balances(server)
        traffic.verify_created(server, created, 8)
        traffic.check(server)
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_a_full_counters_map_is_a_clear_error(tmp_path: Path):
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "keysvc.yaml", storage={"counters_map_size": 1 * MiB},
                          analytics={"enabled": False})
    server = Server(data_dir, workers=2, extra=("--config", str(config)))
    try:
        api_id = call(server, "/v2/apis.createApi", {"name": "full-counters"})["apiId"]
        traffic = Traffic(server, api_id)
        workers = all_workers(server)
        # New ratelimit windows (written by the hot path) fill the counters' map: refused with
        # a 503 naming the setting to raise, like a full store (not a 500).
        traffic.new_windows(server, "map size is used up", "counters_map_size")
        # Keys without credits verify on; keys with credits verify (a charge reuses freed pages)
        # or are refused the same clear way; a new key's balance is refused clearly.
        traffic.check(server, "map size is used up")
        status, payload = post(server, "/v2/keys.createKey", {"apiId": api_id, "credits": {"remaining": 5}})
        if status != 200:
            assert_clear_refusal(status, payload, "map size is used up")
        assert sorted(server.worker_pids()) == workers, f"a worker died:\n{server.log()[-3000:]}"
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    traffic.events = 0  # analytics off: nothing to account for
    server = Server(data_dir, workers=2, extra=("--config", str(config)))
    try:
        traffic.balances(server)
    finally:
        assert server.stop() == 0, server.log()[-3000:]


# -- a read-only data dir --------------------------------------------------------------------------------


def assert_one_clear_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keysvc: error: "), result.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]


def test_a_read_only_data_dir_is_refused_with_one_clear_line(tmp_path: Path, disk):
    mount = disk("32m")
    data_dir = mount / "data"
    config = write_config(tmp_path / "keysvc.yaml")
    server = Server(data_dir, workers=1, extra=("--config", str(config)))
    try:
        api_id = call(server, "/v2/apis.createApi", {"name": "read-only"})["apiId"]
        key = call(server, "/v2/keys.createKey", {"apiId": api_id, "credits": {"remaining": 5}})
        assert call(server, "/v2/keys.verifyKey", {"key": key["key"]})["credits"] == 4
    finally:
        assert server.stop() == 0, server.log()[-3000:]

    remount(mount, "ro")
    try:
        keysvc = [sys.executable, "-m", "keysvc"]
        serve = subprocess.run([*keysvc, "serve", "--data-dir", str(data_dir), "--port", str(free_port()),
                                "--workers", "1", "--config", str(config)], capture_output=True, text=True,
                               timeout=LIVENESS)
        assert_one_clear_error(serve, str(data_dir), "read-only")
        root_key = subprocess.run([*keysvc, "root-key", "create", "--data-dir", str(data_dir)], capture_output=True,
                                  text=True, timeout=LIVENESS)
        assert_one_clear_error(root_key, str(data_dir), "read-only")
    finally:
        remount(mount, "rw")

    server = Server(data_dir, workers=1, extra=("--config", str(config)))  # writable again: nothing lost
    try:
        assert call(server, "/v2/keys.verifyKey", {"key": key["key"]})["credits"] == 3
    finally:
        assert server.stop() == 0, server.log()[-3000:]


# -- corrupted spool records --------------------------------------------------------------------------------


def verification(request_id: str) -> bytes:
    return events.encode(events.VerificationEvent(request_id, int(time.time() * 1000), "ks_1", "", "", "key_1",
                                                  "VALID", ["t=1"], 1, 0.5))


CORRUPTIONS: dict[str, Callable[[Spool], int]] = {}


def corruption(fn: Callable[[Spool], int]) -> Callable[[Spool], int]:
    """Registers fn(spool) -> how many corrupted records it wrote."""
    CORRUPTIONS[fn.__name__] = fn
    return fn


@corruption
def garbage(spool: Spool) -> int:
    assert spool.append([b"\xc1\xff not an event at all", os.urandom(64)])
    return 2


@corruption
def truncated(spool: Spool) -> int:
    whole = verification("req_truncated")
    assert spool.append([whole[: len(whole) // 2]])
    return 1


@corruption
def wrong_shape(spool: Spool) -> int:
    # Well-formed MsgPack: a verification's tag with fields of the wrong types, an unknown tag.
    assert spool.append([msgspec.msgpack.encode([1, 42, None, "x"]), msgspec.msgpack.encode([9, "req_x", 1])])
    return 2


def _put_raw(spool: Spool, key: bytes, value: bytes) -> None:
    with spool.env.begin(write=True, db=spool.events) as txn:
        assert txn.put(key, value)


@corruption
def key_among_sequence_numbers(spool: Spool) -> int:
    # Nine bytes: sorts right after the last event spooled, before the next one.
    last = spool.read(1 << 20)[-1][0]
    _put_raw(spool, last.to_bytes(8, "big") + b"!", verification("req_bad_key"))
    return 1


@corruption
def key_after_sequence_numbers(spool: Spool) -> int:
    # Sorts after every sequence number: appends after it must not be lost.
    _put_raw(spool, b"garbage", verification("req_garbage_key"))
    return 1


@corruption
def inflight_mark(spool: Spool) -> int:
    # Not a range of two sequence numbers: the flusher removes it and sends what is spooled.
    with spool.env.begin(write=True, db=spool.meta) as txn:
        assert txn.put(b"inflight", b"\x00\x01garbage")
    return 0


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_a_corrupted_spool_record_is_skipped_counted_and_logged(tmp_path: Path, corrupt: str):
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "keysvc.yaml", analytics={"flush_interval": 0.2, "drain_timeout": 5.0})
    good = [f"req_good{i:05d}" for i in range(300)]
    spool = Spool(str(data_dir), 1 << 30)
    try:
        assert spool.append([verification(rid) for rid in good[:150]])
        bad = CORRUPTIONS[corrupt](spool)
        for i in range(150, 300, 10):  # more events after the corruption, as workers would append them
            assert spool.append([verification(rid) for rid in good[i:i + 10]])
        assert spool.dropped() == 0
    finally:
        spool.close()

    log_path = tmp_path / "flusher.log"
    flusher = start_flusher(data_dir, config, log_path)
    try:
        def landed() -> bool:
            assert flusher.poll() is None, f"the flusher exited with {flusher.returncode}:\n{log_path.read_text()}"
            if spool_state(data_dir)[:2] != (0, False):
                return False
            try:
                rows = asyncio.run(run_query(str(data_dir), "SELECT count() AS n FROM key_verifications_v1", 10))
            except AnalyticsUnavailable:
                return False
            return rows[0]["n"] >= len(good)

        wait_until(landed, LIVENESS, "the flusher to land the spool", interval=0.2)
        rows = asyncio.run(run_query(str(data_dir), "SELECT request_id FROM key_verifications_v1", 10))
        assert sorted(row["request_id"] for row in rows) == good  # each good one once, no bad one
        assert spool_state(data_dir)[2] == bad  # counted as dropped
        assert flusher.poll() is None, log_path.read_text()
    finally:
        stop_flusher(flusher)
    assert flusher.returncode == 0, log_path.read_text()
    text = log_path.read_text()
    assert "Traceback" not in text, text
    logged = [line for line in text.splitlines() if "error" in line.lower() and  # plain or JSON log lines
              ("could not be decoded" in line or "not a sequence number" in line)]
    assert logged, text
