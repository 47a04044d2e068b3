"""The flusher's rollups (keysvc.analytics.rollups) on the real chDB engine: every raw row is rolled up
once into every grain, also when the flusher dies between a rollup's steps. Runs in a child process,
since a process may open one chDB path only (test_analytics_sql.py's module fixture holds one here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# What the children below share: the chDB at argv[1], migrated, and raw rows inserted one block each.
PRELUDE = """
import itertools, json, sys
import clickhouse_connect
from keysvc.analytics import schema
from keysvc.analytics.rollups import Rollups

client = clickhouse_connect.get_client(interface="chdb", path=sys.argv[1])
schema.migrate(client)
raw = schema.VERIFICATIONS_TABLE
request_ids = itertools.count()


def insert(n):
    for _ in range(n):  # one insert, one block, each
        i = next(request_ids)
        client.command(f"INSERT INTO {raw} (request_id, time, key_space_id, identity_id, external_id, key_id, outcome, "
                       f"spent_credits, latency) VALUES ('req_{i}', toUnixTimestamp64Milli(now64(3)), 'ks_1', '', '', "
                       f"'key_{i % 2}', 'VALID', 1, 0.5)")
"""


def run_child(script: str, *args: str) -> tuple[dict, str]:
    """(the JSON the child printed last, its stderr); the child must exit 0."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


CHILD = PRELUDE + """

def sums():
    return [int(client.command(f"SELECT sum(count) FROM key_verifications_per_{grain}_v1"))
            for grain in schema.GRAINS]


class Died(Exception):
    pass


def dying(at):
    # A flusher killed at one step of a rollup: that step and everything after it never happen.
    rollups = Rollups()
    record, command = rollups._record, client.command

    class Client:
        def __getattr__(self, name):
            return getattr(client, name)

        def command(self, sql, **kw):
            if sql.startswith(f"INSERT INTO {schema.VERIFICATION_ROLLUPS}") and at == "insert":
                raise Died
            return command(sql, **kw)

    def recording(c, source, done, planned):
        step = "plan" if planned != done else "done"
        if step == at:
            raise Died
        record(c, source, done, planned)

    rollups._record = recording
    try:
        rollups.run(Client())
    except Died:
        return
    raise AssertionError("did not die")


out = {}
insert(3)
out["first"] = (Rollups().run(client), sums())
out["nothing_new"] = (Rollups().run(client), sums())
for at in ("plan", "insert", "done"):
    insert(2)
    dying(at)
    out[at] = (Rollups().run(client), sums())
print(json.dumps(out))
"""


def test_every_row_is_rolled_up_once_also_when_a_rollup_dies_half_way(tmp_path: Path) -> None:
    state, _ = run_child(CHILD, str(tmp_path / "chdb"))
    # (ranges rolled up, the sum of count in the minute, hour, day and month aliases)
    assert state["first"] == [1, [3, 3, 3, 3]]
    assert state["nothing_new"] == [0, [3, 3, 3, 3]]
    # Died before its plan was recorded: the next run plans the same rows.
    assert state["plan"] == [1, [5, 5, 5, 5]]
    # Died after the plan, before (or after) the insert: the next run inserts the planned range under
    # the same token, which ClickHouse drops if the first insert had landed.
    assert state["insert"] == [1, [7, 7, 7, 7]]
    assert state["done"] == [1, [9, 9, 9, 9]]


FLUSHER = """
import json, sys, threading, time
from keysvc.analytics import events, flusher, schema
from keysvc.config import from_json

config = from_json(json.dumps({"storage": {"data_dir": sys.argv[1]},
                               "analytics": {"flush_interval": 0.1, "rollup_interval": 0.3}}))
f = flusher.Flusher(config)
assert f.ready()
rollups_table = schema._verification_rollups()[0]  # its CREATE statement
f.client.command(f"DROP TABLE {schema.VERIFICATION_ROLLUPS}")  # every rollup of verifications now fails
now = int(time.time() * 1000)
f.spool.append([events.encode(events.VerificationEvent(f"req_{i}", now, "ks_1", "", "", "key_1", "VALID", [], 1, 0.5))
                for i in range(50)])
loop = threading.Thread(target=f.loop)
loop.start()


def wait(predicate):
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def raw_rows():
    return int(f.client.command(f"SELECT count() FROM {schema.VERIFICATIONS_TABLE}"))


wait(lambda: f.spool.depth() == 0 and raw_rows() == 50 and f.rollup_failing)
time.sleep(1)  # rollups fail, again and again: batches still land
f.spool.append([events.encode(events.VerificationEvent(f"req_b{i}", now, "ks_1", "", "", "key_1", "VALID", [], 1, 0.5))
                for i in range(30)])
wait(lambda: f.spool.depth() == 0 and raw_rows() == 80)
landed_while_failing = (raw_rows(), f.rollup_failing)
f.client.command(rollups_table)  # the table is back: the next rollup takes every row it missed
wait(lambda: not f.rollup_failing and not f.unrolled)
f.request_stop()
loop.join()
print(json.dumps({"landed_while_failing": landed_while_failing,
                  "rolled": int(f.client.command("SELECT sum(count) FROM key_verifications_per_minute_v1"))}))
"""


def test_a_failing_rollup_holds_up_no_batch_and_catches_up_once_it_can(tmp_path: Path) -> None:
    state, log = run_child(FLUSHER, str(tmp_path / "data"))
    assert "rolling up the raw tables failed" in log, log[-3000:]
    assert state == {"landed_while_failing": [80, True], "rolled": 80}


RESTART = PRELUDE + """
insert(int(sys.argv[2]))
Rollups().run(client)
rolled = int(client.command("SELECT sum(count) FROM key_verifications_per_minute_v1"))
if sys.argv[3] == "empty":  # as a TTL that expired every raw row would leave it
    client.command(f"TRUNCATE TABLE {raw}")
print(json.dumps({"rolled": rolled, "newest": int(client.command(schema.max_block_sql(raw)))}))
"""


def test_rows_after_the_raw_tables_block_numbers_restart_are_rolled_up(tmp_path: Path) -> None:
    def step(inserts: int, then: str) -> dict:
        state, log = run_child(RESTART, str(tmp_path / "chdb"), str(inserts), then)
        return {**state, "log": log}

    assert step(3, "empty")["rolled"] == 3
    # A new process numbers the raw table's blocks from the newest part on disk: there is none.
    after = step(2, "-")
    assert after["newest"] == 2 and after["rolled"] == 5
    assert "numbering restarted" in after["log"]
