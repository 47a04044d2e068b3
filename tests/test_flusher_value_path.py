"""The flusher's slow path on the real chDB engine: a batch whose records all decode as events but
which ClickHouse refuses as MsgPack rows (here a latency spooled as an integer, which a Float64 column
does not take) goes again value by value, with the same deduplication tokens: every good event lands
once, in its table, a record that is no event is skipped and counted, and sending the batch again adds
nothing. In a child process, since a process may open one chDB path only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
from keysvc.analytics import events, flusher, schema
from keysvc.config import from_json

config = from_json(json.dumps({"storage": {"data_dir": sys.argv[1]}}))
f = flusher.Flusher(config)
f.client = flusher.connect(config)
schema.migrate(f.client)
now = int(time.time() * 1000)
records = [
    events.encode(events.VerificationEvent("req_v", now, "ks_1", "", "", "key_1", "VALID", ["a"], 1, 2)),
    events.encode(events.RatelimitEvent("req_r", now, "ns_1", "user_1", True, 0.5, "", 10, 9, now + 60_000, 1)),
    b"\\x92\\x01\\xff",  # no event
]
f.spool.append(records)
batch = f.spool.read(10)
first, last = batch[0][0], batch[-1][0]


def counts():
    return [int(f.client.command(f"SELECT count() FROM {table}"))
            for table in (schema.VERIFICATIONS_TABLE, schema.RATELIMITS_TABLE)]


sent = f.send(first, last, batch)
after_first = counts()
dropped, depth = f.spool.dropped(), f.spool.depth()
again = f.send(first, last, batch)  # as a flusher that died before landing it would
print(json.dumps({
    "sent": sent, "again": again, "after_first": after_first, "after_again": counts(), "dropped": dropped,
    "depth": depth,
    "latency": float(f.client.command(f"SELECT latency FROM {schema.VERIFICATIONS_TABLE}")),
}))
"""


def test_rows_clickhouse_refuses_as_msgpack_go_value_by_value_once(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "data")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sending them value by value" in out.stderr, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["sent"] and state["again"], state
    assert state["after_first"] == [1, 1], state  # one verification row, one ratelimit row
    assert state["after_again"] == [1, 1], state  # the same tokens: ClickHouse dropped the second send
    assert state["latency"] == 2.0, state
    assert state["dropped"] == 1 and state["depth"] == 0, state  # the bad record counted, the batch landed
