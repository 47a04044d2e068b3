"""The analytics pipeline end to end: real `keysvc serve --workers 2` processes spool every
verification and ratelimit decision, their flusher writes them to the embedded ClickHouse (chDB),
exactly once, across a flusher killed mid-batch, a ClickHouse that cannot be reached, and SIGTERM.

Assertions read ClickHouse through keysvc.analytics.client.run_query (the flusher answers over
<data_dir>/analytics.sock) while a server runs, or, once it has stopped, by opening chDB in a
child process (only one process may open a chDB data dir, and one path per process).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from keysvc.analytics import events
from keysvc.analytics.client import AnalyticsUnavailable, QueryFailed, run_query
from keysvc.analytics.flusher import CRASH_ENV
from keysvc.analytics.spool import Spool
from keysvc.config import AnalyticsConfig
from server import Server, free_port

FAST = {"flush_interval": 0.2}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def now_ms() -> int:
    return int(time.time() * 1000)


def config_file(tmp_path: Path, **analytics: Any) -> Path:
    path = tmp_path / f"keysvc-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"analytics": analytics}))
    return path


def start(data_dir: Path, config: Path, env: dict[str, str] | None = None) -> Server:
    return Server(data_dir, workers=2, extra=("--config", str(config)), env=env)


def query(data_dir: Path, sql: str, timeout: float = 10.0) -> list[dict]:
    return asyncio.run(run_query(str(data_dir), sql, timeout))


def scalar(data_dir: Path, sql: str) -> Any:
    return next(iter(query(data_dir, sql)[0].values()))


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except AnalyticsUnavailable as exc:  # the flusher is (re)starting
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def spool_depth(data_dir: Path) -> int:
    spool = Spool(str(data_dir), AnalyticsConfig().spool_map_size)
    try:
        return spool.depth()
    finally:
        spool.close()


def chdb_query(data_dir: Path, sql: str) -> list[list[Any]]:
    """Rows from the node's chDB, opened by a child process: only while no flusher has it open."""
    code = ("import json, sys, clickhouse_connect\n"
            "client = clickhouse_connect.get_client(interface='chdb', path=sys.argv[1])\n"
            "print(json.dumps([list(r) for r in client.query(sys.argv[2]).result_rows], default=str))\n"
            "client.close()\n")
    out = subprocess.run([sys.executable, "-c", code, str(data_dir / "chdb"), sql], capture_output=True, text=True,
                         timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def call(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, payload = server.call(path, body)
    assert status == 200, payload
    return payload["data"]


class Traffic:
    """An API with keys in every state, and a mix of verifications and ratelimit calls."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.api_id = call(server, "/v2/apis.createApi", {"name": unique("analytics")})["apiId"]
        new = lambda **kw: call(server, "/v2/keys.createKey", {"apiId": self.api_id, **kw})["key"]  # noqa: E731
        self.keys = {
            "valid": new(),
            "disabled": new(enabled=False),
            "expired": new(expires=now_ms() - 60_000),
            "credited": new(credits={"remaining": 5}),
        }
        self.namespace = unique("ns")

    def verify(self, n: int) -> Counter:
        """n verifications, spread over both workers; the codes they answered, counted."""
        plan = ["valid", "valid", "valid", "missing", "disabled", "expired", "credited", "valid", "missing", "credited"]

        def one(i: int) -> str:
            which = plan[i % len(plan)]
            key = self.keys.get(which, f"sk_missing_{i}")
            return call(self.server, "/v2/keys.verifyKey", {"key": key, "tags": [f"batch={i % 3}"]})["code"]

        with ThreadPoolExecutor(8) as pool:
            return Counter(pool.map(one, range(n)))

    def limit(self, n: int, limit: int = 5) -> int:
        passed = 0
        for _ in range(n):
            passed += call(self.server, "/v2/ratelimit.limit", {"namespace": self.namespace, "identifier": "user-1",
                                                                 "limit": limit, "duration": 3_600_000})["success"]
        return passed


def outcomes(data_dir: Path) -> Counter:
    rows = query(data_dir, "SELECT outcome, count() AS n FROM key_verifications_v1 GROUP BY outcome")
    return Counter({row["outcome"]: row["n"] for row in rows})


def rolled_up(data_dir: Path) -> tuple[int, int]:
    return (scalar(data_dir, "SELECT sum(count) FROM key_verifications_per_minute_v1"),
            scalar(data_dir, "SELECT sum(total) FROM ratelimits_per_minute_v1"))


def assert_exactly_once(data_dir: Path, verifications: int, ratelimits: int) -> None:
    # Once the spool is empty every insert has returned; the flusher then rolls them up.
    wait_for(lambda: spool_depth(data_dir) == 0, what="an empty spool")
    row = query(data_dir, "SELECT count() AS n, uniqExact(request_id) AS ids FROM key_verifications_v1")[0]
    assert row == {"n": verifications, "ids": verifications}
    wait_for(lambda: rolled_up(data_dir) == (verifications, ratelimits), what="the rollups")
    for grain in ("minute", "hour", "day", "month"):  # the rollups saw every insert once too
        assert scalar(data_dir, f"SELECT sum(count) FROM key_verifications_per_{grain}_v1") == verifications, grain
        assert scalar(data_dir, f"SELECT sum(total) FROM ratelimits_per_{grain}_v1") == ratelimits, grain
    row = query(data_dir, "SELECT count() AS n, uniqExact(request_id) AS ids FROM ratelimits_v1")[0]
    assert row == {"n": ratelimits, "ids": ratelimits}


# -- the tests -----------------------------------------------------------------------------------------


def test_the_query_client_without_a_flusher_is_unavailable(tmp_path):
    with pytest.raises(AnalyticsUnavailable):
        query(tmp_path, "SELECT 1")


def test_verifications_and_ratelimits_arrive_exactly_once(tmp_path):
    data_dir = tmp_path / "data"
    server = start(data_dir, config_file(tmp_path, **FAST))
    try:
        # A record no decoder can read, spooled among the real ones: skipped, counted, harmless.
        spool = Spool(str(data_dir), AnalyticsConfig().spool_map_size)
        try:
            assert spool.append([b"\xc1 not an event"])
        finally:
            spool.close()
        traffic = Traffic(server)
        codes = traffic.verify(300)
        assert {"VALID", "NOT_FOUND", "DISABLED", "EXPIRED", "USAGE_EXCEEDED"} <= set(codes)
        passed = traffic.limit(12)
        assert passed == 5

        wait_for(lambda: outcomes(data_dir) == codes, what="the verifications")
        wait_for(lambda: scalar(data_dir, "SELECT count() FROM ratelimits_v1") == 12, what="the ratelimits")
        assert_exactly_once(data_dir, 300, 12)
        row = query(data_dir, "SELECT countIf(passed) AS passed, sum(tokens) AS tokens, any(limit) AS lim "
                              "FROM ratelimits_v1 WHERE namespace_id != ''")[0]
        assert row == {"passed": 5, "tokens": 12, "lim": 5}
        per_minute = query(data_dir, "SELECT outcome, sum(count) AS n FROM key_verifications_per_minute_v1 "
                                     "GROUP BY outcome")
        assert Counter({r["outcome"]: r["n"] for r in per_minute}) == codes
        # The credited key spent one credit on each of its five VALID verifications.
        assert scalar(data_dir, "SELECT sum(spent_credits) FROM key_verifications_v1") == 5
        latest = query(data_dir, "SELECT time FROM key_verifications_per_hour_v1 ORDER BY time DESC LIMIT 1")
        assert abs(latest[0]["time"] - now_ms()) < 2 * 3_600_000  # DateTime comes back as unix ms

        with pytest.raises(QueryFailed, match="readonly"):
            query(data_dir, "INSERT INTO key_verifications_raw_v2 (request_id) VALUES ('x')")
        with pytest.raises(QueryFailed, match="TIMEOUT_EXCEEDED|Timeout"):
            query(data_dir, "SELECT count() FROM numbers(1000000000000)", timeout=0.3)

        wait_for(lambda: spool_depth(data_dir) == 0, what="an empty spool")
        spool = Spool(str(data_dir), AnalyticsConfig().spool_map_size)
        try:
            assert spool.dropped() == 1  # the undecodable record
            assert spool.inflight() is None
        finally:
            spool.close()
        assert "could not be decoded" in server.log()
    finally:
        assert server.stop() == 0
    assert not (data_dir / "analytics.sock").exists()


def test_records_clickhouse_refuses_as_msgpack_go_value_by_value_and_corrupt_ones_are_skipped(tmp_path):
    """The flusher inserts spooled records as MsgPack rows as they are. A record that decodes as an
    event but that ClickHouse refuses (an integer latency: MsgPack gives no Float64 from an int)
    sends its batch through the typed path instead; a truncated record is skipped and counted."""
    data_dir = tmp_path / "data"
    server = start(data_dir, config_file(tmp_path, **FAST))
    try:
        fine = events.encode(events.VerificationEvent("req_fine", now_ms(), "ks_x", "", "", "key_x", "VALID", ["a"],
                                                      1, 0.25))
        integer_latency = msgspec.msgpack.encode([1, "req_int_latency", now_ms(), "ks_x", "", "", "key_x", "VALID",
                                                  [], 0, 3])
        assert events.decode(integer_latency).latency == 3.0
        spool = Spool(str(data_dir), AnalyticsConfig().spool_map_size)
        try:
            assert spool.append([fine, integer_latency, fine[:-3]])
        finally:
            spool.close()
        wait_for(lambda: spool_depth(data_dir) == 0, what="an empty spool")
        rows = query(data_dir, "SELECT request_id, latency FROM key_verifications_v1 ORDER BY request_id")
        assert rows == [{"request_id": "req_fine", "latency": 0.25}, {"request_id": "req_int_latency", "latency": 3.0}]
        wait_for(lambda: query(data_dir, "SELECT sum(count) AS n FROM key_verifications_per_month_v1") == [{"n": 2}],
                 what="the rollups")
        spool = Spool(str(data_dir), AnalyticsConfig().spool_map_size)
        try:
            assert spool.dropped() == 1
        finally:
            spool.close()
        assert "as MsgPack rows" in server.log() and "could not be decoded" in server.log()
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("point", ["between_tables", "before_land"])
def test_a_flusher_killed_mid_batch_is_restarted_and_duplicates_nothing(tmp_path, point):
    data_dir = tmp_path / "data"
    marker = tmp_path / "crashed"
    server = start(data_dir, config_file(tmp_path, **FAST), env={CRASH_ENV: f"{point}:{marker}"})
    try:
        wait_for(lambda: server.flusher_pids(), what="the flusher")
        first = server.flusher_pids()
        traffic = Traffic(server)
        codes = traffic.verify(200)
        traffic.limit(10)
        wait_for(marker.exists, what="the flusher to kill itself")
        crashed_pid = int(marker.read_text().split()[0])
        assert crashed_pid in first
        wait_for(lambda: server.flusher_pids() and crashed_pid not in server.flusher_pids(),
                 what="a new flusher")
        wait_for(lambda: outcomes(data_dir) == codes, what="the verifications")
        wait_for(lambda: scalar(data_dir, "SELECT count() FROM ratelimits_v1") == 10, what="the ratelimits")
        wait_for(lambda: spool_depth(data_dir) == 0, what="the batch in flight to land")
        assert "sending the batch in flight again" in server.log()
        assert_exactly_once(data_dir, 200, 10)
    finally:
        assert server.stop() == 0


def test_an_unreachable_clickhouse_keeps_events_spooled_until_it_returns(tmp_path):
    data_dir = tmp_path / "data"
    nowhere = config_file(tmp_path, flush_interval=0.2, drain_timeout=1.0,
                          clickhouse_url=f"http://127.0.0.1:{free_port()}")
    server = start(data_dir, nowhere)
    try:
        traffic = Traffic(server)
        codes = traffic.verify(120)  # every call answered 200 (call() checks)
        traffic.limit(8)
        assert spool_depth(data_dir) == 128
        with pytest.raises(AnalyticsUnavailable):
            query(data_dir, "SELECT 1")
        time.sleep(1.0)  # the flusher keeps retrying; nothing is lost meanwhile
        assert spool_depth(data_dir) == 128
        assert "cannot reach ClickHouse" in server.log()
    finally:
        assert server.stop() == 0
    assert spool_depth(data_dir) == 128

    server = start(data_dir, config_file(tmp_path, **FAST))  # back to the embedded engine
    try:
        wait_for(lambda: outcomes(data_dir) == codes, what="the spooled verifications")
        wait_for(lambda: scalar(data_dir, "SELECT count() FROM ratelimits_v1") == 8, what="the ratelimits")
        assert_exactly_once(data_dir, 120, 8)
        assert spool_depth(data_dir) == 0
    finally:
        assert server.stop() == 0


def test_the_spool_cap_holds_while_clickhouse_is_unreachable(tmp_path):
    data_dir = tmp_path / "data"
    cap = 64 << 10
    server = start(data_dir, config_file(tmp_path, flush_interval=0.2, drain_timeout=0.5, spool_cap_bytes=cap,
                                         clickhouse_url=f"http://127.0.0.1:{free_port()}"))
    try:
        Traffic(server).verify(1500)  # about three times what fits under the cap

        def capped() -> bool:
            spool = Spool(str(data_dir), AnalyticsConfig().spool_map_size)
            try:
                return spool.dropped() > 0 and spool.size_bytes() <= cap
            finally:
                spool.close()

        wait_for(capped, what="the flusher to enforce the cap")
        spool = Spool(str(data_dir), AnalyticsConfig().spool_map_size)
        try:
            assert 0 < spool.depth() < 1500
            assert spool.depth() + spool.dropped() == 1500  # every event spooled, or counted as dropped
        finally:
            spool.close()
        assert "over its cap" in server.log()
    finally:
        assert server.stop() == 0


def test_sigterm_drains_the_spool_into_clickhouse(tmp_path):
    data_dir = tmp_path / "data"
    # A flush interval far away: the events are still spooled when SIGTERM comes.
    server = start(data_dir, config_file(tmp_path, flush_interval=600, drain_timeout=15))
    try:
        traffic = Traffic(server)
        codes = traffic.verify(150)
        traffic.limit(6)
        assert spool_depth(data_dir) == 156
        flusher = server.flusher_pids()
        assert len(flusher) == 1
    finally:
        assert server.stop(timeout=40) == 0
    assert not Path(f"/proc/{flusher[0]}").exists()
    assert spool_depth(data_dir) == 0
    rows = chdb_query(data_dir, "SELECT outcome, count() FROM key_verifications_raw_v2 GROUP BY outcome")
    assert Counter({outcome: int(n) for outcome, n in rows}) == codes
    assert chdb_query(data_dir, "SELECT count(), uniqExact(request_id) FROM ratelimits_raw_v2") == [[6, 6]]


def test_a_drain_timeout_too_short_leaves_the_rest_spooled(tmp_path):
    data_dir = tmp_path / "data"
    server = start(data_dir, config_file(tmp_path, flush_interval=600, drain_timeout=0))
    try:
        codes = Traffic(server).verify(50)
    finally:
        assert server.stop() == 0
    assert spool_depth(data_dir) == 50  # never lost: still spooled, for the next start

    server = start(data_dir, config_file(tmp_path, **FAST))
    try:
        wait_for(lambda: outcomes(data_dir) == codes, what="the verifications")
        assert_exactly_once(data_dir, 50, 0)
    finally:
        assert server.stop() == 0


def test_the_supervisor_restarts_a_flusher_killed_from_outside(tmp_path):
    data_dir = tmp_path / "data"
    server = start(data_dir, config_file(tmp_path, **FAST))
    try:
        wait_for(lambda: server.flusher_pids(), what="the flusher")
        (pid,) = server.flusher_pids()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: server.flusher_pids() and pid not in server.flusher_pids(), what="a new flusher")
        codes = Traffic(server).verify(40)
        wait_for(lambda: outcomes(data_dir) == codes, what="the verifications")
        # In the node's log format (JSON, off a terminal), as serve's own lines.
        (said,) = [json.loads(line) for line in server.log().splitlines() if "starting it again" in line]
        assert (said["level"], said["logger"], said["role"]) == ("warning", "keysvc.analytics", "master"), said
        assert f"flusher (pid {pid}) exited with {-signal.SIGKILL}" in said["msg"], said
    finally:
        assert server.stop() == 0


def thread_nices(pid: int) -> dict[int, int]:
    """{thread id: nice} of a process's threads; a thread that ends while /proc is read is left out."""
    nices = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            # /proc/<pid>/task/<tid>/stat: the 19th field, counted after the parenthesized command name.
            nices[int(task.name)] = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        except FileNotFoundError:
            pass
    return nices


def test_the_flusher_works_at_nice_19_but_writes_the_spool_at_the_workers_priority(tmp_path):
    """The flusher (and chDB's threads) run at nice 19, except the one thread that makes its
    spool write transactions, whose lock the workers share: a nice-19 holder of that lock would
    keep them waiting for as long as the scheduler keeps it waiting (keysvc/analytics/priority.py)."""
    data_dir = tmp_path / "data"
    server = start(data_dir, config_file(tmp_path, **FAST))
    try:
        wait_for(lambda: server.flusher_pids(), what="the flusher")
        (pid,) = server.flusher_pids()
        codes = Traffic(server).verify(20)
        wait_for(lambda: outcomes(data_dir) == codes, what="the verifications")  # batches landed
        workers_nice = os.getpriority(os.PRIO_PROCESS, server.process.pid)
        nice = thread_nices(pid)
        assert nice[pid] == 19, nice  # the main thread: batches, chDB inserts
        assert list(nice.values()).count(workers_nice) == 1, nice  # the spool's writer
        # The rest at 19, but for chDB's MemoryWorker threads, which raise themselves (root may).
        assert all(value == 19 or value < 0 for value in nice.values() if value != workers_nice), nice
    finally:
        assert server.stop() == 0
