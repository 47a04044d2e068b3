"""The analytics schema's migrations on the real chDB engine: a new database gets the newest version at
once; a database at version 1 (as keysvc wrote it before version 2 existed) is migrated with its rows
intact, and its rollups go on from where version 1's materialized view left them (version 3: the
flusher's rollups, keysvc.analytics.rollups); migrating again changes nothing. Each step runs in a
child process, since a process may open one chDB path only (the module fixture of
test_analytics_sql.py holds one in this one)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from keysvc.analytics import schema

CHILD = """
import json, sys
import clickhouse_connect
from keysvc.analytics import schema
from keysvc.analytics.rollups import Rollups

path, upto, insert = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "insert"
if upto < schema.SCHEMA_VERSION:  # keysvc as it was when `upto` was the newest version
    schema.MIGRATIONS = [m for m in schema.MIGRATIONS if m[0] <= upto]
    schema.SCHEMA_VERSION = upto
client = clickhouse_connect.get_client(interface="chdb", path=path)
found = schema.migrate(client)
if insert:
    client.command(f"INSERT INTO {schema.VERIFICATIONS_TABLE} (request_id, time, key_space_id, identity_id, "
                   f"external_id, key_id, outcome, spent_credits, latency) VALUES ('req_1', toUnixTimestamp64Milli("
                   f"now64(3)), 'ks_1', '', '', 'key_1', 'VALID', 1, 0.5)")
if upto >= 3:  # what the flusher does once the spool is empty
    Rollups().run(client)
settings = {
    table: client.command(f"SELECT create_table_query FROM system.tables WHERE database = currentDatabase() "
                          f"AND name = '{table}'")
    for table in schema.MERGE_TREE_TABLES
}
print(json.dumps({
    "found": found,
    "version": schema.current_version(client),
    "rows": int(client.command(f"SELECT count() FROM {schema.VERIFICATIONS_TABLE}")),
    "rollup": int(client.command("SELECT sum(count) FROM key_verifications_per_minute_v1")),
    "merge_less": {table: f"merge_selector_base = {schema.MERGE_SELECTOR_BASE}" in query
                   for table, query in settings.items()},
}))
client.close()
"""


def migrate(path: Path, upto: int = schema.SCHEMA_VERSION, insert: bool = False) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(upto), "insert" if insert else "-"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_new_database_gets_the_newest_version(tmp_path: Path) -> None:
    state = migrate(tmp_path / "chdb")
    assert (state["found"], state["version"]) == (0, schema.SCHEMA_VERSION)
    assert all(state["merge_less"].values()), state


def test_a_version_1_database_is_migrated_with_its_rows_and_only_once(tmp_path: Path) -> None:
    path = tmp_path / "chdb"
    old = migrate(path, upto=1, insert=True)
    assert (old["found"], old["version"], old["rows"], old["rollup"]) == (0, 1, 1, 1)
    assert not any(old["merge_less"].values()), old  # version 1 left ClickHouse's default

    # The row version 1's view rolled up is not rolled up again; the one inserted after is, once.
    new = migrate(path, insert=True)
    assert (new["found"], new["version"], new["rows"], new["rollup"]) == (1, 3, 2, 2)
    assert all(new["merge_less"].values()), new

    again = migrate(path)
    assert (again["found"], again["version"], again["rows"], again["rollup"]) == (3, 3, 2, 2)
